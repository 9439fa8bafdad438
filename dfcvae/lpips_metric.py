"""LPIPS (Zhang et al. 2018, "The unreasonable effectiveness of deep features as a perceptual
metric"): the reconstruction metric reported beside FID, PSNR and SSIM.

The `lpips` package supplies the network and its learned linear layers (v0.1, shipped inside the
package). Its backbone (AlexNet or VGG16 features) would load through torchvision's download; here
it loads through `dfcvae.weights` instead (the same torch cache, the same sentence when the file
is missing), or from a file, or stays random for tests.

Comparable with published LPIPS (v0.1) only with `eval.lpips_weights: imagenet`, the same `net`
(`alex` is the common choice), and images at the same size; a random backbone's numbers rank
distortions but compare with nothing.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from dfcvae.config import ConfigError
from dfcvae.weights import load_file_state_dict, load_imagenet_state_dict

NETS = {"alex": "alexnet", "vgg": "vgg16"}  # lpips' name -> torchvision's (dfcvae.weights)
RANDOM_BACKBONE_SEED = 0  # eval.lpips_weights: random


class LPIPS(nn.Module):
    """Distance between image batches x, y (B, 3, H, W) in [-1, 1] -> (B,), 0 for identical images.

    net: alex | vgg; weights: imagenet | random | a file holding torchvision's state_dict of that
    network (keys features.N.*); setting: the params.yaml keys' prefix that errors name
    (eval.lpips for the metric, loss.lpips for the loss). Raises ConfigError for an unknown net,
    FileNotFoundError when the ImageNet file is neither cached nor downloadable (dfcvae.weights
    says where to put it).
    """

    def __init__(self, net: str = "alex", weights: str = "imagenet", setting: str = "eval.lpips"):
        super().__init__()
        import lpips

        if net not in NETS:
            raise ConfigError(f"{setting}_net '{net}' is not one of {', '.join(NETS)}.")
        state = None
        if weights == "imagenet":
            state = load_imagenet_state_dict(NETS[net], setting=f"{setting}_weights")
        elif weights != "random":
            state = load_file_state_dict(weights)
        # A random backbone is drawn from a fixed seed, never from the process's RNG state, so one
        # model scores the same in every run (the draw leaves the process's RNG as it was).
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision's old `pretrained=`
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if state is not None:
            load_backbone(self.model.net, state)
        self.requires_grad_(False)
        self.eval()
        self.net, self.weights = net, weights

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode: its dropout stays off, inside a training model too."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.distance(x, y)

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """As calling it, with gradients to x and y (loss.lpips_weight); the network stays frozen."""
        return self.model(x.float(), y.float()).flatten()


def load_backbone(net: nn.Module, state: dict[str, Tensor]) -> None:
    """torchvision's `features.N.*` tensors into lpips' slices, whose modules keep the index N."""
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    ours = {}
    for slice_name, block in net.named_children():
        for key in block.state_dict():
            ours[f"{slice_name}.{key}"] = features[key]  # "3.weight" in slice2 is features.3.weight
    net.load_state_dict(ours)
