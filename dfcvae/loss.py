"""The DFC-VAE objective (Hou et al. 2017, eq. 3-4) -> (loss, logs).

    L = alpha * KL + beta * sum_l 1 / (2 C_l H_l W_l) * ||Phi_l(x) - Phi_l(x_hat)||^2
        (+ pixel_weight * pixel MSE: none in the paper; params.yaml uses 1, docs/quality.md says why)

KL is summed over latent dimensions and averaged over the batch; the feature
term is per image, averaged over the batch. `loss.feature_norm` makes the
feature term scale-free (the same beta means the same across backbones):
    none    the paper's 1/(2 C_l H_l W_l) ||Phi_l(x) - Phi_l(x_hat)||^2
    energy  that, divided by the layer's mean squared target feature on the batch,
            1/(C_l H_l W_l) ||Phi_l(x)||^2 (a relative squared error: 1/2 for x_hat = 0)
    unit    each position's channel vector scaled to unit length first, as LPIPS does
            (Zhang et al. 2018, eq. 1, without its learnt weights): 1/(2 H_l W_l) sum ||.||^2 in [0, 2]
`loss.kl_warmup_steps` ramps alpha linearly from 0: alpha * min(1, step / warmup).
`loss.feature_shift` s > 0: in training, the feature term compares the same random window of x and
x_hat, cropped s px smaller at an offset in [0, s] (`shifted_crops`), against the lattice.
Reductions run in float32, so the loss is well defined under bf16 autocast. Target features Phi(x) are computed
without a graph; the reconstruction's features keep theirs so gradients reach
the decoder. Logs are detached tensors (no device sync per step) keyed `split/name`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import torch
from torch import Tensor

from dfcvae.config import ConfigError, FeatureNorm, LossConfig
from dfcvae.features import PerceptualNetwork


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)), summed over latents, mean over the batch (>= 0)."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)).mean()


FEATURE_NORMS = typing.get_args(FeatureNorm)
_EPS = 1e-10


def check_feature_norm(norm: str) -> None:
    if norm not in FEATURE_NORMS:
        raise ConfigError(f"loss.feature_norm {norm!r} is not one of {', '.join(FEATURE_NORMS)}.")


def feature_distances(target: dict[str, Tensor], recon: dict[str, Tensor], norm: str = "none") -> dict[str, Tensor]:
    """Per layer {name: scalar}, averaged over the batch; maps (B, C_l, H_l, W_l); see the module docstring."""
    check_feature_norm(norm)
    out = {}
    for name in target:
        t, r = target[name].float(), recon[name].float()
        if norm == "unit":  # (B, C, H, W) / (B, 1, H, W)
            t = t / (t.pow(2).sum(1, keepdim=True).sqrt() + _EPS)
            r = r / (r.pow(2).sum(1, keepdim=True).sqrt() + _EPS)
            out[name] = 0.5 * (r - t).pow(2).sum(1).mean()
            continue
        distance = 0.5 * (r - t).pow(2).mean()
        out[name] = distance / (t.pow(2).mean().detach() + _EPS) if norm == "energy" else distance
    return out


def feature_distances_per_image(target: dict[str, Tensor], recon: dict[str, Tensor]) -> Tensor:
    """Each image's sum over layers of 1/(2 C H W) ||Phi_l(x) - Phi_l(x_hat)||^2 (norm none) -> (B,) float64;
    its batch mean is the sum of `feature_distances`' layers."""
    return sum(0.5 * (recon[name].double() - target[name].double()).pow(2).flatten(1).mean(dim=1) for name in target)


def check_feature_shift(shift: int, image_size: int) -> None:
    """loss.feature_shift must leave a window at least half the image: ConfigError otherwise."""
    if not 0 <= shift <= image_size // 2:
        raise ConfigError(
            f"loss.feature_shift is {shift}; it must be 0 (off) to {image_size // 2} px for {image_size} px images, "
            "for example the deepest perceptual layer's stride minus 1."
        )


def shifted_crops(x: Tensor, recon: Tensor, shift: int) -> tuple[Tensor, Tensor]:
    """The same random (H - shift) x (W - shift) window of both batches, its corner drawn from
    [0, shift]^2 with the global RNG (seeded per step): a stride-s feature network then sees the
    image on a grid that moves from step to step, so matching its features no longer rewards
    energy at fixed phases of the pixel grid (the lattice; Zhang 2019). Index tensors, not Python
    ints: no recompilation under torch.compile."""
    h, w = x.shape[-2:]
    corner = torch.randint(0, shift + 1, (2,), device=x.device)
    rows = torch.arange(h - shift, device=x.device) + corner[0]
    cols = torch.arange(w - shift, device=x.device) + corner[1]
    return x.index_select(-2, rows).index_select(-1, cols), recon.index_select(-2, rows).index_select(-1, cols)


def perceptual_term(perceptual: PerceptualNetwork, x: Tensor, recon: Tensor, norm: str = "none") -> dict[str, Tensor]:
    with torch.no_grad():
        target = perceptual(x)
    return feature_distances(target, perceptual(recon), norm)


def kl_warmup(cfg: LossConfig, step: int) -> float:
    """The fraction of alpha in force at `step` (0-based count of finished optimiser steps)."""
    if cfg.kl_warmup_steps <= 0:
        return 1.0
    return min(1.0, step / cfg.kl_warmup_steps)


def dfc_vae_loss(
    x: Tensor,
    recon: Tensor,
    mu: Tensor,
    logvar: Tensor,
    perceptual: PerceptualNetwork | None,
    cfg: LossConfig,
    split: str = "train",
    kl_scale: float | Tensor = 1.0,
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """-> (loss, logs); kl_scale multiplies alpha (the warm-up's `kl_warmup`; a tensor under
    torch.compile). With loss.lpips_weight > 0, `lpips` (x, recon -> per-image distances with
    gradients, `dfcvae.lpips_metric.LPIPS.distance`) adds that weight times its batch mean."""
    kl = kl_divergence(mu, logvar)
    pixel_mse = (recon.float() - x.float()).pow(2).mean()
    loss = cfg.kl_weight * kl_scale * kl + cfg.pixel_weight * pixel_mse
    logs = {f"{split}/kl": kl.detach(), f"{split}/pixel_mse": pixel_mse.detach()}
    if cfg.perceptual_weight > 0:
        if perceptual is None:
            raise ConfigError("loss.perceptual_weight > 0 needs a perceptual network.")
        seen = shifted_crops(x, recon, cfg.feature_shift) if cfg.feature_shift > 0 and split == "train" else (x, recon)
        per_layer = perceptual_term(perceptual, *seen, cfg.feature_norm)
        feature_loss = torch.stack(list(per_layer.values())).sum()
        loss = loss + cfg.perceptual_weight * feature_loss
        logs[f"{split}/perceptual"] = feature_loss.detach()
        logs.update({f"{split}/perceptual_{name}": v.detach() for name, v in per_layer.items()})
    if cfg.lpips_weight > 0:
        if lpips is None:
            raise ConfigError("loss.lpips_weight > 0 needs the LPIPS network (loss.lpips_net).")
        distance = lpips(x, recon).mean()
        loss = loss + cfg.lpips_weight * distance
        logs[f"{split}/lpips"] = distance.detach()
    logs[f"{split}/loss"] = loss.detach()
    return loss, logs
