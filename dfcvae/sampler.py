"""Prior samplers: where the latent codes of generated images come from.

    normal  z ~ N(0, T^2 I), T = eval.temperature: the VAE's prior, cooled when T < 1 (samples
            nearer the prior's mode, less varied)
    gmm     an ex-post density on the latent means of training images (Ghosh et al. 2020, "From
            variational to deterministic autoencoders", sec. 4; pythae's GaussianMixtureSampler):
            a Gaussian mixture of eval.gmm_components full-covariance components, fit by
            scikit-learn's EM on the means of eval.probe_train_samples train images

A fitted VAE's aggregate posterior rarely fills N(0, I); codes drawn where the training images'
codes are decode to more plausible images, without retraining. A sampler is a few tensors,
written as safetensors (`save_sampler`, no pickle) beside the evaluation and with the registered
model, so the served model's `sample` mode and `pipeline.sample` draw as the evaluation did.
"""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dfcvae.config import ConfigError, SamplerName

SAMPLERS = typing.get_args(SamplerName)
SAMPLER_FILE = "sampler.safetensors"


class NormalSampler:
    """z ~ N(0, T^2 I) in `latent_dim` dimensions."""

    kind = "normal"

    def __init__(self, latent_dim: int, temperature: float = 1.0):
        if not temperature > 0:
            raise ConfigError(f"eval.temperature {temperature} must be positive: 1 is the prior, 0.4-0.8 cooler.")
        self.latent_dim, self.temperature = latent_dim, float(temperature)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, latent_dim) float32 on CPU, from `generator`."""
        return torch.randn(n, self.latent_dim, generator=generator) * self.temperature

    def tensors(self) -> dict[str, Tensor]:
        return {"temperature": torch.tensor([self.temperature]), "latent_dim": torch.tensor([self.latent_dim])}


class GaussianMixtureSampler:
    """A Gaussian mixture over latent codes: weights (K,), means (K, D), Cholesky factors (K, D, D)."""

    kind = "gmm"

    def __init__(self, weights: Tensor, means: Tensor, scale_tril: Tensor):
        self.weights, self.means, self.scale_tril = weights.double(), means.double(), scale_tril.double()
        self.latent_dim = self.means.shape[1]

    @classmethod
    def fit(cls, latents: Tensor, components: int, seed: int) -> GaussianMixtureSampler:
        """EM on latent means (N, D), K = min(components, N // 2) full-covariance components.
        ConfigError for fewer than 2 latents per component or components < 1."""
        from sklearn.mixture import GaussianMixture

        if components < 1:
            raise ConfigError(f"eval.gmm_components {components} must be at least 1.")
        k = min(components, len(latents) // 2)
        if k < 1:
            raise ConfigError(f"a Gaussian mixture needs at least 2 train latents, got {len(latents)}.")
        gm = GaussianMixture(k, covariance_type="full", random_state=seed, reg_covar=1e-6)
        gm.fit(latents.double().numpy())
        scale_tril = np.linalg.cholesky(gm.covariances_)
        return cls(torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_), torch.from_numpy(scale_tril))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, D) float32 on CPU: a component by weight, then its Gaussian, from `generator`."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.latent_dim, 1, generator=generator, dtype=torch.float64)
        return (self.means[component] + (self.scale_tril[component] @ noise).squeeze(-1)).float()

    def tensors(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "means": self.means, "scale_tril": self.scale_tril}


Sampler = NormalSampler | GaussianMixtureSampler


def save_sampler(sampler: Sampler, path: Path) -> Path:
    """The sampler's tensors as safetensors, its kind in the header's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sampler.tensors().items()}, path, metadata={"kind": sampler.kind})
    return path


def load_sampler(path: Path) -> Sampler:
    """A sampler written by `save_sampler`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        kind = (handle.metadata() or {}).get("kind")
    tensors = load_file(path)
    if kind == "gmm":
        return GaussianMixtureSampler(tensors["weights"], tensors["means"], tensors["scale_tril"])
    if kind == "normal":
        return NormalSampler(int(tensors["latent_dim"][0]), float(tensors["temperature"][0]))
    raise ValueError(f"{path} is not a dfcvae sampler (kind {kind!r}).")
