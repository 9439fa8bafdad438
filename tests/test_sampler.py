"""The prior samplers (dfcvae/sampler.py): N(0, T^2 I) and the Gaussian mixture on train latents."""

from __future__ import annotations

import pytest
import torch

from dfcvae.config import Config, ConfigError
from dfcvae.sampler import GaussianMixtureSampler, NormalSampler, load_sampler, save_sampler


def clusters(n: int = 600) -> torch.Tensor:
    """Latents from two well-separated Gaussians in 4-d, weights 0.75 and 0.25."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(int(n * 0.75), 4, generator=g) * 0.3 + torch.tensor([3.0, 0, 0, 0])
    small = torch.randn(n - len(big), 4, generator=g) * 0.3 - torch.tensor([3.0, 0, 0, 0])
    return torch.cat([big, small])


def test_normal_sampler_at_temperature_one_draws_what_the_prior_did():
    """The FID protocol's samples are unchanged: z = randn(n, d) from the seeded generator."""
    z = NormalSampler(8).sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(z, torch.randn(5, 8, generator=torch.Generator().manual_seed(3)))
    cool = NormalSampler(8, 0.5).sample(5, torch.Generator().manual_seed(3))
    assert torch.allclose(cool, z * 0.5)


def test_mixture_recovers_the_clusters_and_draws_where_the_latents_are():
    sampler = GaussianMixtureSampler.fit(clusters(), components=2, seed=0)
    order = sampler.means[:, 0].argsort(descending=True)
    assert sampler.weights[order].tolist() == pytest.approx([0.75, 0.25], abs=0.02)
    assert sampler.means[order][:, 0].tolist() == pytest.approx([3.0, -3.0], abs=0.1)
    z = sampler.sample(4000, torch.Generator().manual_seed(1))
    assert z.shape == (4000, 4) and z.dtype == torch.float32
    assert (z[:, 0] > 0).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert z[:, 0].abs().min() > 1.0  # nothing between the clusters, unlike N(0, I)


def test_samplers_round_trip_through_safetensors_and_draw_the_same(tmp_path):
    for sampler in (GaussianMixtureSampler.fit(clusters(), 3, seed=0), NormalSampler(4, 0.7)):
        path = save_sampler(sampler, tmp_path / f"{sampler.kind}.safetensors")
        assert not path.read_bytes().startswith((b"\x80", b"PK"))  # no pickle, no torch zip
        again = load_sampler(path)
        assert again.kind == sampler.kind
        draw = lambda s: s.sample(16, torch.Generator().manual_seed(2))  # noqa: E731
        assert torch.equal(draw(again), draw(sampler))


def test_bad_sampler_settings_are_one_sentence():
    with pytest.raises(ConfigError, match="eval.sampler: 'vamp' is not one of normal, gmm; pick one"):
        Config().with_overrides({"eval.sampler": "vamp"})
    with pytest.raises(ConfigError, match="eval.temperature 0 must be positive"):
        NormalSampler(4, 0)
    with pytest.raises(ConfigError, match="at least 2 train latents"):
        GaussianMixtureSampler.fit(torch.zeros(1, 4), 10, seed=0)
