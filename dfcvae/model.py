"""The VAE of DFC-VAE: a convolutional encoder and decoder (Hou et al. 2017, fig. 2).

Image convention, everywhere in the project: model inputs and outputs are float
tensors in [-1, 1] of shape (B, 3, H, W); the decoder ends in tanh. The loss and
the frozen perceptual network live elsewhere (loss.py, features.py), so this
module's state_dict is exactly what a checkpoint needs.

The default shape follows PyTorch-VAE (channels 32-64-128-256-512, latent 128);
each encoder stage halves the resolution, so any image size divisible by
2**len(hidden_channels) works (64 and 128 px with the default).

Three decoders (`model.upsample`):
    nearest     the paper's (houxianxu/DFC-VAE, CVAE.lua): x2 nearest-neighbour upsampling,
                replication padding 1, 3x3 conv, BatchNorm, LeakyReLU(0.2); the last stage
                maps straight to RGB. Every output pixel sees the same kernel taps, so it
                cannot draw the period-2 checkerboard of a stride-2 transposed conv.
    bilinear    the default: the same with x2 bilinear upsampling (half-pixel centres): each
                stage's output is a smooth interpolation, not 2 x 2 blocks, so no stage prints its
                grid into the image at periods 2, 4, 8, ... With `loss.feature_shift` it keeps
                the DFC-VAE's reconstructions free of a lattice (docs/quality.md, the lattice).
    transposed  3x3 stride-2 transposed convs (PyTorch-VAE's), then a 3x3 conv to RGB.
                Kernel 3 over stride 2 covers output pixels unevenly (Odena et al. 2016,
                "Deconvolution and checkerboard artifacts"). Models saved before the option
                existed are this decoder.

`model.full_res_convs` n > 0 (nearest and bilinear): n stages of 3x3 conv, BatchNorm, LeakyReLU(0.2)
run at full resolution before a 3x3 conv to RGB, the first of them the last upsampling's own conv
(which then keeps its channels instead of mapping to RGB).
The paper's head (n = 0) is linear at full resolution, so a bilinear decoder's output holds
little above the half-resolution stage's band; a nonlinear stage there can draw that octave,
the same way at every pixel (docs/quality.md, full-resolution stages).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfcvae.config import ConfigError, ModelConfig


def _down(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def _resize_conv(c_in: int, c_out: int, mode: str, bias: bool = False) -> list[nn.Module]:
    # (B, c_in, s, s) -> (B, c_out, 2s, 2s); mode: nearest | bilinear
    return [nn.Upsample(scale_factor=2, mode=mode), nn.ReplicationPad2d(1), nn.Conv2d(c_in, c_out, 3, bias=bias)]


def _full_res(c_in: int, c_out: int) -> tuple[nn.Module, ...]:
    # (B, c_in, s, s) -> (B, c_out, s, s)
    return nn.ReplicationPad2d(1), nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)


def _up_resize(c_in: int, c_out: int, mode: str) -> nn.Sequential:
    return nn.Sequential(*_resize_conv(c_in, c_out, mode), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's weights_init, which the paper's code applies: conv N(0, 0.02), BatchNorm N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        channels = (3, *cfg.hidden_channels)
        self.convs = nn.Sequential(*(_down(a, b, cfg.encoder_kernel) for a, b in zip(channels[:-1], channels[1:])))
        self.bottom = bottom_size(cfg, image_size)
        flat = cfg.hidden_channels[-1] * self.bottom**2
        self.mu = nn.Linear(flat, cfg.latent_dim)
        self.logvar = nn.Linear(flat, cfg.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.convs(x).flatten(1)  # (B, C_last * s * s)
        return self.mu(h), self.logvar(h)  # (B, latent), (B, latent)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        channels = cfg.hidden_channels[::-1]  # 512 -> 32
        self.bottom = bottom_size(cfg, image_size)
        self.fc = nn.Linear(cfg.latent_dim, channels[0] * self.bottom**2)
        pairs = list(zip(channels[:-1], channels[1:]))
        if cfg.full_res_convs < 0:
            raise ConfigError(f"model.full_res_convs is {cfg.full_res_convs}; set it to 0 or more.")
        if cfg.full_res_convs and cfg.upsample == "transposed":
            raise ConfigError(
                f"model.full_res_convs is {cfg.full_res_convs}, but the transposed decoder has no such stages: "
                "set it to 0, or model.upsample to bilinear or nearest."
            )
        if cfg.upsample != "transposed" and cfg.full_res_convs:  # the last upsampling keeps its channels
            c = channels[-1]
            self.ups = nn.Sequential(*(_up_resize(a, b, cfg.upsample) for a, b in (*pairs, (c, c))))
            refine = (m for _ in range(cfg.full_res_convs - 1) for m in _full_res(c, c))
            rgb = (nn.ReplicationPad2d(1), nn.Conv2d(c, 3, 3), nn.Tanh())
            self.head = nn.Sequential(*refine, *rgb)
        elif cfg.upsample != "transposed":  # the paper's stages; the last maps straight to RGB
            self.ups = nn.Sequential(*(_up_resize(a, b, cfg.upsample) for a, b in pairs))
            self.head = nn.Sequential(*_resize_conv(channels[-1], 3, cfg.upsample, bias=True), nn.Tanh())
        else:  # the last upsampling returns to full resolution, then a 3x3 conv maps to RGB
            self.ups = nn.Sequential(*(_up(a, b) for a, b in pairs))
            self.head = nn.Sequential(
                _up(channels[-1], channels[-1]),
                nn.Conv2d(channels[-1], 3, 3, padding=1),
                nn.Tanh(),
            )

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).unflatten(1, (-1, self.bottom, self.bottom))  # (B, C_last, s, s)
        return self.head(self.ups(h))  # (B, 3, H, W) in [-1, 1]


def bottom_size(cfg: ModelConfig, image_size: int) -> int:
    factor = 2 ** len(cfg.hidden_channels)
    if image_size % factor:
        raise ConfigError(
            f"image size {image_size} is not divisible by 2**{len(cfg.hidden_channels)} = {factor}: "
            f"choose data.image_size as a multiple of {factor} or use fewer model.hidden_channels."
        )
    return image_size // factor


class DFCVAE(nn.Module):
    """Raises ConfigError for an image size the stages cannot halve (the architecture's closed
    choices, model.upsample and the rest, are checked where the config is read)."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        self.image_size = image_size
        self.encoder = Encoder(cfg, image_size)
        self.decoder = Decoder(cfg, image_size)
        if cfg.init == "dcgan":
            dcgan_init(self)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # z = mu + sigma * eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (reconstruction, mu, logvar); the reconstruction decodes a sampled z."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction through the latent mean."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = next(self.parameters()).device
        # Drawn on the generator's device so a CPU generator gives the same z on any device.
        z = torch.randn(n, self.latent_dim, generator=generator, device=generator.device if generator else device)
        return self.decode(z.to(device))
