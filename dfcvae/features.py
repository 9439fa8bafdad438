"""The frozen perceptual network Φ of DFC-VAE: named hidden layers of an ImageNet CNN.

Built to avoid what goes wrong in PyTorch-VAE's DFCVAE:
- layers are chosen by name (`relu1_1`, as the original DFC-VAE code does), with
  names derived from the module sequence, so they are right for VGG with and
  without BatchNorm;
- inputs in [-1, 1] are mapped to ImageNet mean/std (buffers) before the network;
- the network is cut after the deepest requested layer;
- ReLUs are made out-of-place so a returned feature is never overwritten;
- it is frozen and stays in eval mode: `train()` is overridden, so a parent's
  `.train()` cannot put its BatchNorm back into training mode;
- it is a separate module, never inside the VAE: never in a checkpoint, never DDP-wrapped;
- with `antialias`, every subsampling step low-passes first (Zhang 2019, "Making convolutional
  networks shift-invariant again"), with the same weights: matching strided features otherwise
  rewards a lattice at the stride's period (Azulay and Weiss 2019; docs/quality.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, vgg

from dfcvae.config import Config, ConfigError, PerceptualConfig
from dfcvae.device import Runtime
from dfcvae.weights import load_file_state_dict, load_imagenet_state_dict

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg_layer_names(features: nn.Sequential) -> list[str]:
    """conv{block}_{i}, bn{block}_{i}, relu{block}_{i}, pool{block}, one per module."""
    names, block, conv = [], 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.BatchNorm2d):
            names.append(f"bn{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        elif isinstance(module, nn.MaxPool2d):
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            raise TypeError(f"unexpected VGG module {module}")
    return names


def mobilenet_layer_names(features: nn.Sequential) -> list[str]:
    """block{i}: the output of MobileNetV2's features[i]."""
    return [f"block{i}" for i in range(len(features))]


@dataclass(frozen=True)
class Backbone:
    build: Callable[[], nn.Sequential]  # the feature extractor, randomly initialised
    layer_names: Callable[[nn.Sequential], list[str]]
    presets: dict[str, tuple[str, ...]]


VGG_PRESETS = {  # Hou et al. 2017, sec. 3.3; vae1234 adds relu4_1 to vae123 (docs/quality.md)
    "vae123": ("relu1_1", "relu2_1", "relu3_1"),
    "vae1234": ("relu1_1", "relu2_1", "relu3_1", "relu4_1"),
    "vae345": ("relu3_1", "relu4_1", "relu5_1"),
}
# MobileNetV2 has no relu{k}_1; its taps at the end of the first stages of
# resolution 1/2, 1/4, 1/8 and of the 1/16, 1/32 stages play the same roles.
MOBILENET_PRESETS = {
    "vae123": ("block1", "block3", "block6"),
    "vae1234": ("block1", "block3", "block6", "block13"),
    "vae345": ("block6", "block13", "block17"),
}

BACKBONES: dict[str, Backbone] = {
    "vgg19_bn": Backbone(lambda: vgg.make_layers(vgg.cfgs["E"], batch_norm=True), vgg_layer_names, VGG_PRESETS),
    "vgg19": Backbone(lambda: vgg.make_layers(vgg.cfgs["E"], batch_norm=False), vgg_layer_names, VGG_PRESETS),
    "vgg16_bn": Backbone(lambda: vgg.make_layers(vgg.cfgs["D"], batch_norm=True), vgg_layer_names, VGG_PRESETS),
    "vgg16": Backbone(lambda: vgg.make_layers(vgg.cfgs["D"], batch_norm=False), vgg_layer_names, VGG_PRESETS),
    "mobilenet_v2": Backbone(lambda: mobilenet_v2().features, mobilenet_layer_names, MOBILENET_PRESETS),
}


def backbone_spec(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"unknown perceptual backbone '{name}'; choose one of {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def resolve_layers(backbone: str, layers: Sequence[str]) -> tuple[str, ...]:
    """Expand a preset (`vae123`) and check every name against the backbone's layers."""
    spec = backbone_spec(backbone)
    if len(layers) == 1 and layers[0] in spec.presets:
        return spec.presets[layers[0]]
    valid = spec.layer_names(spec.build())
    for name in layers:
        if name not in valid:
            raise ConfigError(
                f"unknown layer '{name}' for {backbone}; valid names are presets "
                f"{', '.join(spec.presets)} or layers {', '.join(valid)}."
            )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layer list {list(layers)} names a layer twice.")
    return tuple(layers)


def lattice_periods(cfg: Config) -> list[int]:
    """2 and the stride of each perceptual.layers layer that fits a data.image_size image at least
    twice: the periods at which matching these features could reward a lattice (`metrics.phase_energy`)."""
    strides = layer_strides(cfg.perceptual.backbone, tuple(cfg.perceptual.layers)).values()
    return sorted({2} | {s for s in strides if 2 <= s <= cfg.data.image_size // 2})


@functools.lru_cache(maxsize=16)
def layer_strides(backbone: str, layers: tuple[str, ...]) -> dict[str, int]:
    """Each layer's stride: input pixels per feature-map position (1, 2, 4, ...), measured by
    running the randomly initialised backbone on a 64 px input (once per backbone and layers)."""
    spec = backbone_spec(backbone)
    names = resolve_layers(backbone, layers)
    features = spec.build().eval()
    taps = {spec.layer_names(features).index(name): name for name in names}
    out, h = {}, torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        for index, module in enumerate(features[: max(taps) + 1]):
            h = module(h)
            if index in taps:
                out[taps[index]] = 64 // h.shape[-1]
    return {name: out[name] for name in names}


class Blur(nn.Module):
    """The binomial low-pass [1, 2, 1] x [1, 2, 1] / 16 per channel, reflect-padded, then every
    `stride`-th pixel: (B, C, H, W) -> (B, C, ceil(H / stride), ceil(W / stride)). Zhang 2019's
    BlurPool with its 3-tap filter (antialiased-cnns, `antialiased_cnns/blurpool.py`)."""

    def __init__(self, stride: int = 1):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / 16).view(1, 1, 3, 3), persistent=False)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        kernel = self.kernel.expand(x.shape[1], 1, 3, 3)
        return nn.functional.conv2d(x, kernel, stride=self.stride, groups=x.shape[1])


def blur_before_subsampling(module: nn.Module) -> None:
    """Low-pass before every subsampling inside `module`, in place and with the same weights (Zhang
    2019, sec. 3): a strided convolution becomes Blur then the convolution, which equals the
    convolution at stride 1, blurred, then subsampled (blur and convolution commute); a 2 x 2 max
    pool at stride 2 becomes the max pool at stride 1, then Blur at stride 2 (MaxBlurPool). Output
    sizes are kept. Any other subsampling raises TypeError."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1:
            setattr(module, name, nn.Sequential(Blur(), child))
        elif isinstance(child, nn.MaxPool2d):
            if (child.kernel_size, child.stride, child.padding) not in ((2, 2, 0), ((2, 2), (2, 2), 0)):
                raise TypeError(f"cannot antialias {child}: only a 2 x 2 max pool at stride 2")
            setattr(module, name, nn.Sequential(nn.MaxPool2d(2, stride=1), Blur(stride=2)))
        else:
            blur_before_subsampling(child)


def _load_weights(features: nn.Sequential, backbone: str, weights: str) -> None:
    if weights == "random":
        log.warning(
            "PERCEPTUAL NETWORK %s HAS RANDOM WEIGHTS: the feature loss is not the paper's; "
            "use perceptual.weights=imagenet for real training.",
            backbone,
        )
        return
    state = load_imagenet_state_dict(backbone) if weights == "imagenet" else load_file_state_dict(weights)
    # Full-model state_dicts prefix the extractor with "features."; bare ones do not.
    if any(k.startswith("features.") for k in state):
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    features.load_state_dict(state, strict=True)


class PerceptualNetwork(nn.Module):
    """x in [-1, 1], (B, 3, H, W) -> {layer name: feature map}, frozen, eval mode forever."""

    def __init__(self, backbone: str, layers: Sequence[str], weights: str, antialias: bool = False):
        super().__init__()
        spec = backbone_spec(backbone)
        self.backbone, self.weights, self.antialias = backbone, weights, antialias
        self.layers = resolve_layers(backbone, layers)
        features = spec.build()
        _load_weights(features, backbone, weights)
        names = spec.layer_names(features)
        self.taps = {names.index(name): name for name in self.layers}
        self.body = features[: max(self.taps) + 1]  # nothing past the deepest requested layer
        if antialias:
            blur_before_subsampling(self.body)
        for module in self.body.modules():
            if hasattr(module, "inplace"):
                module.inplace = False  # a returned feature must not be overwritten by the next ReLU
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_config(cls, cfg: PerceptualConfig) -> PerceptualNetwork:
        return cls(cfg.backbone, cfg.layers, cfg.weights, cfg.antialias)

    def train(self, mode: bool = True) -> PerceptualNetwork:
        return super().train(False)  # frozen: BatchNorm statistics must never update

    def normalize(self, x: Tensor) -> Tensor:
        return ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet statistics

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.normalize(x)
        out: dict[str, Tensor] = {}
        for index, module in enumerate(self.body):
            h = module(h)
            if index in self.taps:
                out[self.taps[index]] = h
        return {name: out[name] for name in self.layers}  # in the requested order

    def describe(self) -> dict[str, str]:
        return {
            "perceptual.backbone": self.backbone,
            "perceptual.layers": ",".join(self.layers),
            "perceptual.weights": self.weights,
            "perceptual.antialias": str(self.antialias).lower(),
        }


def build_reference(cfg: Config, runtime: Runtime) -> PerceptualNetwork:
    """The fixed-layer network of validation and evaluation (eval.reference_*): the same for every
    model, whatever it trains with."""
    net = PerceptualNetwork(cfg.eval.reference_backbone, cfg.eval.reference_layers, cfg.eval.reference_weights)
    return net.to(runtime.device, memory_format=runtime.memory_format)
