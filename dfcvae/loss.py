"""The DFC-VAE objective (Hou et al. 2017, eq. 3-4) -> (loss, logs).

    L = alpha * KL + beta * sum_l 1 / (2 C_l H_l W_l) * ||Phi_l(x) - Phi_l(x_hat)||^2
        (+ pixel_weight * pixel MSE, 0 by default as in the paper)

KL is summed over latent dimensions and averaged over the batch; the feature
term is per image, averaged over the batch. Reductions run in float32, so the
loss is well defined under bf16 autocast. Target features Phi(x) are computed
without a graph; the reconstruction's features keep theirs so gradients reach
the decoder. Logs are detached tensors (no device sync per step) keyed `split/name`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfcvae.config import LossConfig
from dfcvae.features import PerceptualNetwork


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)), summed over latents, mean over the batch (>= 0)."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)).mean()


def feature_distances(target: dict[str, Tensor], recon: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per layer: 1/(2 C H W) * ||Phi_l(x) - Phi_l(x_hat)||^2, averaged over the batch."""
    return {name: 0.5 * (recon[name].float() - target[name].float()).pow(2).mean() for name in target}


def perceptual_term(perceptual: PerceptualNetwork, x: Tensor, recon: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        target = perceptual(x)
    return feature_distances(target, perceptual(recon))


def dfc_vae_loss(
    x: Tensor,
    recon: Tensor,
    mu: Tensor,
    logvar: Tensor,
    perceptual: PerceptualNetwork | None,
    cfg: LossConfig,
    split: str = "train",
) -> tuple[Tensor, dict[str, Tensor]]:
    kl = kl_divergence(mu, logvar)
    pixel_mse = (recon.float() - x.float()).pow(2).mean()
    loss = cfg.kl_weight * kl + cfg.pixel_weight * pixel_mse
    logs = {f"{split}/kl": kl.detach(), f"{split}/pixel_mse": pixel_mse.detach()}
    if cfg.perceptual_weight > 0:
        if perceptual is None:
            raise ValueError("loss.perceptual_weight > 0 needs a perceptual network.")
        per_layer = perceptual_term(perceptual, x, recon)
        feature_loss = torch.stack(list(per_layer.values())).sum()
        loss = loss + cfg.perceptual_weight * feature_loss
        logs[f"{split}/perceptual"] = feature_loss.detach()
        logs.update({f"{split}/perceptual_{name}": v.detach() for name, v in per_layer.items()})
    logs[f"{split}/loss"] = loss.detach()
    return loss, logs
