"""Pictures: grids of samples, reconstructions, interpolations and attribute arithmetic, and
how every grid of the project is drawn and saved.

Each grid function returns (images (rows * cols, 3, H, W) in [-1, 1] on CPU, cols), in row-major
order: torchvision's make_grid takes cols as `nrow`. A saved grid has GRID_PADDING px between
S x S images, so R rows and C columns make a C (S + 2) + 2 by R (S + 2) + 2 px PNG (`grid_size`).
The grid functions take any model-like object with `encode(x) -> (mu, logvar)`,
`decode(z) -> x` and `latent_dim` (metrics.LatentModel).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from torch import Tensor, nn
from torchvision.utils import make_grid

from dfcvae.config import UserError
from dfcvae.metrics import LatentModel, to_unit

GRID_PADDING = 2  # torchvision's save_image default
GRID_MARK = ("Software", "dfcvae")  # a PNG text chunk: the grids this project wrote


def grid_size(rows: int, cols: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of rows x cols images of image_size px."""
    step = image_size + GRID_PADDING
    return cols * step + GRID_PADDING, rows * step + GRID_PADDING


def grid_image(images: Tensor, nrow: int) -> Image.Image:
    """[-1, 1] images (N, 3, S, S) -> one RGB grid, `nrow` images per row, GRID_PADDING px apart."""
    grid = make_grid(to_unit(images.detach().float().cpu()), nrow=nrow, padding=GRID_PADDING)
    return Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def save_grid(images: Tensor, path: str | Path, nrow: int) -> Path:
    """Write [-1, 1] images as one PNG grid (`grid_image`), marked as this project's (GRID_MARK).
    UserError rather than overwrite a file at `path` that this project did not write."""
    path = Path(path)
    if path.exists() and not _written_here(path):
        raise UserError(f"{path} exists and is not a picture this project wrote: choose another path, or move it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(*GRID_MARK)
    grid_image(images, nrow).save(path, format="PNG", pnginfo=info)
    return path


def _written_here(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get(GRID_MARK[0]) == GRID_MARK[1]
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _evaluating(model: LatentModel) -> Iterator[None]:
    """no_grad and eval mode (BatchNorm running stats) for the call, then the old mode back."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _device_of(model: LatentModel) -> torch.device:
    if isinstance(model, nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def _latent_means(model: LatentModel, images: Tensor) -> Tensor:
    mu, _ = model.encode(images.to(_device_of(model)))
    return mu  # (B, latent_dim)


def sample_grid(
    model: LatentModel, n: int, generator: torch.Generator, nrow: int | None = None, z: Tensor | None = None
) -> tuple[Tensor, int]:
    """Decodings of n draws z ~ N(0, I) from `generator`, or of the given codes z (n, latent_dim).

    Grid: ceil(n / cols) rows x cols, cols = nrow or ceil(sqrt(n)).
    """
    cols = nrow or math.ceil(math.sqrt(n))
    if z is None:
        z = torch.randn(n, model.latent_dim, generator=generator, device=generator.device)
    with _evaluating(model):
        images = model.decode(z.to(_device_of(model)))
    return images.cpu(), cols


def reconstruction_grid(model: LatentModel, images: Tensor) -> tuple[Tensor, int]:
    """B inputs above their reconstructions decode(mu).

    Grid: 2 rows x B cols; row 0 the inputs, row 1 the reconstructions.
    """
    with _evaluating(model):
        recon = model.decode(_latent_means(model, images))
    return torch.cat([images.cpu().float(), recon.cpu()]), len(images)


def interpolation_grid(model: LatentModel, pairs_a: Tensor, pairs_b: Tensor, steps: int) -> tuple[Tensor, int]:
    """Decodings along the straight line between the latent means of a[i] and b[i].

    Grid: P rows x `steps` cols; row i goes from decode(mu(a[i])) at t = 0 to
    decode(mu(b[i])) at t = 1 in equal steps.
    """
    if len(pairs_a) != len(pairs_b) or steps < 2:
        raise ValueError(
            f"need equally many a and b images and steps >= 2, got {len(pairs_a)}, {len(pairs_b)}, {steps}."
        )
    with _evaluating(model):
        mu_a, mu_b = _latent_means(model, pairs_a), _latent_means(model, pairs_b)  # (P, D)
        t = torch.linspace(0.0, 1.0, steps, device=mu_a.device).view(1, steps, 1)
        z = (1 - t) * mu_a.unsqueeze(1) + t * mu_b.unsqueeze(1)  # (P, steps, D)
        images = model.decode(z.flatten(0, 1))
    return images.cpu(), steps


def attribute_vector(latents: Tensor, attrs: Tensor, index: int) -> Tensor:
    """Mean latent of images with attribute `index` minus mean of those without: (D,)."""
    has = torch.as_tensor(attrs)[:, index].to(latents.device) == 1
    if has.all() or not has.any():
        raise ValueError(
            f"attribute {index} needs images with and without it, got {int(has.sum())} of {len(has)} with."
        )
    return latents[has].mean(dim=0) - latents[~has].mean(dim=0)


def attribute_arithmetic_grid(
    model: LatentModel, images: Tensor, attr_vector: Tensor, strengths: Sequence[float]
) -> tuple[Tensor, int]:
    """Hou et al. 2017's attribute figure: decode(mu(x) + s * v) for each strength s.

    Grid: B rows x len(strengths) cols; row i is images[i], column j strength s_j
    (include 0 for the plain reconstruction).
    """
    with _evaluating(model):
        mu = _latent_means(model, images)  # (B, D)
        s = torch.as_tensor(strengths, dtype=mu.dtype, device=mu.device).view(1, -1, 1)
        z = mu.unsqueeze(1) + s * attr_vector.to(mu).view(1, 1, -1)  # (B, S, D)
        out = model.decode(z.flatten(0, 1))
    return out.cpu(), len(strengths)
