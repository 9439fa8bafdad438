"""How sure a number is: bootstrap intervals, FID and KID from stored features, paired comparisons.

The evaluation keeps what its numbers are made of (`Scores`, written as `scores.npz`): each test
image's per-image metrics and the Inception features of the test images, their reconstructions
and the prior samples. Every interval is computed from those arrays, with no second pass of any
network, and the registry's champion gate compares two models' `Scores` image by image.

Sources:
    percentile bootstrap          Efron and Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13
    FID                           Heusel et al. 2017, eq. 6
    KID                           Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 4: the unbiased
                                  MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, and its spread over
                                  subsets of the two sets
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from dfcvae import metrics
from dfcvae.config import ConfigError, UserError

SCORES_FILE = "scores.npz"
# Features are stored in float16: 10,000 images x 2048 features are 41 MB per set instead of 82.
# Every FID of an evaluation (metrics.json's, its intervals, the gate's) is computed from the stored
# arrays, so they all agree; the rounding moves an FID by under 0.01% (tests/test_uncertainty.py).
FEATURE_DTYPE = np.float16
FEATURE_SETS = ("real", "recon", "samples")

# eval.objective -> its value from (fid_recon, fid_samples); lower is better.
OBJECTIVES: dict[str, Callable[[float, float], float]] = {
    "fid_recon": lambda recon, samples: recon,
    "fid_samples": lambda recon, samples: samples,
    "fid_sum": lambda recon, samples: recon + samples,
}


class ScoresError(UserError, ValueError):
    """Two evaluations' scores cannot be compared, or a scores file is not one."""


@dataclass(frozen=True)
class Scores:
    """What one evaluation measured, image by image.

    per_image: {metric: (N,) float64}, the i-th value belongs to the i-th test image (shard order);
    real, recon: (N, D) Inception features of the test images and of their reconstructions;
    samples: (M, D) of the prior samples, the j-th decoded from the j-th code of seed eval.seed.
    """

    per_image: dict[str, NDArray[np.float64]]
    real: NDArray
    recon: NDArray
    samples: NDArray

    def __post_init__(self) -> None:
        n = len(self.real)
        if self.recon.shape != self.real.shape or self.samples.ndim != 2 or self.samples.shape[1] != self.real.shape[1]:
            raise ScoresError(
                f"scores need real and recon features of one shape (N, D) and samples (M, D), got "
                f"{self.real.shape}, {self.recon.shape} and {self.samples.shape}."
            )
        wrong = sorted(k for k, v in self.per_image.items() if np.shape(v) != (n,))
        if wrong:
            raise ScoresError(f"per-image scores {', '.join(wrong)} do not have one value for each of the {n} images.")

    def as_stored(self) -> Scores:
        """These scores as `save` stores them and `load` reads them back: features in FEATURE_DTYPE,
        per-image values in float64. Numbers computed from them equal those from the stored file."""
        return Scores(
            {k: np.asarray(v, np.float64) for k, v in self.per_image.items()},
            **{k: getattr(self, k).astype(FEATURE_DTYPE) for k in FEATURE_SETS},
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        stored = self.as_stored()
        arrays = {f"features_{k}": getattr(stored, k) for k in FEATURE_SETS}
        arrays |= {f"image_{k}": v for k, v in stored.per_image.items()}
        with path.open("wb") as handle:  # np.savez would append .npz to any other name
            np.savez(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Raises ScoresError for a file that is not an evaluation's scores (no pickles are read)."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {k: stored[k] for k in stored.files}
        except (OSError, ValueError) as err:
            raise ScoresError(f"{path} is not an evaluation's scores file ({err}): re-run the evaluate stage.") from err
        missing = [f"features_{k}" for k in FEATURE_SETS if f"features_{k}" not in arrays]
        if missing:
            raise ScoresError(f"{path} lacks {', '.join(missing)}: re-run the evaluate stage.")
        return cls(
            per_image={k.removeprefix("image_"): v for k, v in arrays.items() if k.startswith("image_")},
            **{k: arrays[f"features_{k}"] for k in FEATURE_SETS},
        )

    @property
    def count(self) -> int:
        return len(self.real)

    def fids(self, images: NDArray | None = None, samples: NDArray | None = None) -> tuple[float, float]:
        """(FID of the reconstructions, FID of the samples) against the real images; `images` and
        `samples` pick rows (a bootstrap resample), default all."""
        if images is not None and min(self.count, len(self.samples)) <= self.real.shape[1]:
            recon, drawn = self._resamplers
            samples = np.arange(len(self.samples)) if samples is None else samples
            return recon(images, images), drawn(images, samples)
        real, recon = (self.real, self.recon) if images is None else (self.real[images], self.recon[images])
        drawn = self.samples if samples is None else self.samples[samples]
        return fid_from_features(real, recon), fid_from_features(real, drawn)

    @functools.cached_property
    def _resamplers(self) -> tuple[GramFID, GramFID]:
        return GramFID(self.real, self.recon), GramFID(self.real, self.samples)


def objective_value(name: str, fid_recon: float, fid_samples: float) -> float:
    return OBJECTIVES[name](fid_recon, fid_samples)


# ---------------------------------------------------------------- FID and KID from features


def fid_from_features(real: NDArray, fake: NDArray) -> float:
    """FID of two feature sets (N, D) and (M, D), in float64.

    With fewer images than dimensions (the usual case below 2048 images) the matrix root is taken
    in image space: with A = centred real^T / sqrt(N - 1) and B likewise, S1 = A A^T, S2 = B B^T,
    and the nonzero eigenvalues of S1 S2 are the squared singular values of A^T B (N x M), so
    tr (S1 S2)^1/2 is A^T B's nuclear norm: an N x M SVD instead of D x D eigenproblems.
    Otherwise `metrics.frechet_distance` on the moments. On a 2-core machine: about 20 ms at 120
    images, 7 CPU-s at 10,000.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"FID needs two feature sets (N >= 2, D) of one D, got {x.shape} and {y.shape}.")
    if min(len(x), len(y)) > x.shape[1]:
        return metrics.frechet_distance(*metrics.feature_statistics(x), *metrics.feature_statistics(y))
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("FID of non-finite features: the images hold NaN or infinite values; there is no distance.")
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    a = (x - mean_x) / math.sqrt(len(x) - 1)
    b = (y - mean_y) / math.sqrt(len(y) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mean_x - mean_y
    distance = diff @ diff + np.einsum("ij,ij->", a, a) + np.einsum("ij,ij->", b, b) - 2.0 * trace_sqrt
    return max(float(distance), 0.0)  # >= 0 exactly; below is rounding


class GramFID:
    """FID of row resamples of two feature sets without touching the feature dimension again.

    For rows i of X (N, D) and j of Y (M, D), every term of `fid_from_features` is a sum over the
    Gram matrices X X^T, Y Y^T and X Y^T (computed once): the means' distance and the traces from
    their entries, and tr (S1 S2)^1/2 as the nuclear norm of the doubly centred X_i Y_j^T. A
    resample of 120 images then costs an index and a 120 x 120 SVD instead of two (120, 2048)
    products (tests/test_uncertainty.py checks it equals `fid_from_features`).
    """

    def __init__(self, x: NDArray, y: NDArray) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        self.xx, self.yy, self.xy = x @ x.T, y @ y.T, x @ y.T

    def __call__(self, i: NDArray, j: NDArray) -> float:
        n, m = len(i), len(j)
        xx, yy, xy = self.xx[np.ix_(i, i)], self.yy[np.ix_(j, j)], self.xy[np.ix_(i, j)]
        means = xx.sum() / n**2 + yy.sum() / m**2 - 2.0 * xy.sum() / (n * m)  # ||mean_x - mean_y||^2
        trace_x = (np.trace(xx) - xx.sum() / n) / (n - 1)
        trace_y = (np.trace(yy) - yy.sum() / m) / (m - 1)
        centred = xy - xy.mean(axis=0, keepdims=True) - xy.mean(axis=1, keepdims=True) + xy.mean()
        # Singular values as roots of C C^T's eigenvalues: 3x faster than an SVD at 120 x 120.
        eigenvalues = np.linalg.eigvalsh(centred @ centred.T if n <= m else centred.T @ centred)
        trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum() / math.sqrt((n - 1) * (m - 1))
        return max(float(means + trace_x + trace_y - 2.0 * trace_sqrt), 0.0)


def _kernel(x: NDArray, y: NDArray) -> NDArray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: NDArray, y: NDArray) -> float:
    """Bińkowski et al.'s unbiased MMD^2 of (N, D) and (M, D) features with the cubic kernel."""
    n, m = len(x), len(y)
    kxx, kyy, kxy = _kernel(x, x), _kernel(y, y), _kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kid(real: NDArray, fake: NDArray, subset_size: int, subsets: int, seed: int) -> tuple[float, float]:
    """KID of two feature sets -> (value, spread).

    value: the unbiased MMD^2 on all images (its expectation is the population MMD^2 at any size,
    unlike FID's); spread: the standard deviation of the same estimate over `subsets` random pairs
    of subsets of min(subset_size, N // 2, M // 2) images each, drawn without replacement (seed),
    as Bińkowski et al. report it. Raises ValueError under 4 images per set.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(x), len(y)) < 4:
        raise ValueError(f"KID needs at least 4 images per set, got {len(x)} and {len(y)}.")
    size = min(subset_size, len(x) // 2, len(y) // 2)
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(subsets)
    ]
    return mmd2_unbiased(x, y), float(np.std(values, ddof=1)) if subsets > 1 else 0.0


# ---------------------------------------------------------------- bootstrap


def resamples(n: int, count: int, seed: int) -> NDArray[np.int64]:
    """(count, n) row indices drawn with replacement from range(n)."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def percentile_interval(values: NDArray, confidence: float) -> list[float]:
    """[low, high], the two-sided percentile interval of bootstrap replicates at `confidence`."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values, np.float64), [tail, 1.0 - tail])
    return [float(low), float(high)]


def centred_interval(value: float, replicates: NDArray, quantiles: tuple[float, float]) -> list[float]:
    """[low, high]: `value` plus the quantiles of the replicates' deviations from their own mean.

    For FID. An FID is compared at a fixed image count (its bias depends on the count: Chong and
    Forsyth 2020), so what its interval must carry is the spread of that count's FID. A bootstrap
    resample repeats about a third of the images, which raises FID: plain percentile intervals
    of 40 images lay wholly above the value (tests/test_uncertainty.py). Centring keeps the
    replicates' spread and skew and drops that shift.
    """
    deviations = np.asarray(replicates, np.float64) - np.mean(replicates)
    low, high = np.quantile(deviations, quantiles)
    return [float(value + low), float(value + high)]


def check_confidence(confidence: float, what: str) -> None:
    if not 0.5 <= confidence < 1.0:
        raise ConfigError(f"{what} is {confidence}; it must be a probability in [0.5, 1), for example 0.95.")


def intervals(scores: Scores, confidence: float, count: int, seed: int) -> dict[str, list[float]]:
    """Bootstrap intervals of every number `scores` gives, at `confidence`.

    -> {metric: [low, high]} for each per-image metric's mean (images resampled), and for
    fid_recon, fid_samples and fid_sum (test images and samples resampled together, each from its
    own set). `count` resamples from `seed`.
    """
    check_confidence(confidence, "eval.confidence")
    images = resamples(scores.count, count, seed)
    drawn = resamples(len(scores.samples), count, seed + 1)
    out = {
        name: percentile_interval(np.asarray(values)[images].mean(axis=1), confidence)
        for name, values in scores.per_image.items()
    }
    with threadpool_limits(1):  # small matrices: threads only contend
        fids = np.array([scores.fids(i, j) for i, j in zip(images, drawn, strict=True)])  # (count, 2)
    recon, samples = scores.fids()
    tails = ((1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0)
    out["fid_recon"] = centred_interval(recon, fids[:, 0], tails)
    out["fid_samples"] = centred_interval(samples, fids[:, 1], tails)
    out["fid_sum"] = centred_interval(recon + samples, fids.sum(axis=1), tails)
    return out


# ---------------------------------------------------------------- paired comparison


@dataclass(frozen=True)
class Difference:
    """A challenger's number against a champion's on the same images.

    relative: (challenger - champion) / champion, below 0 when the challenger's is lower;
    interval: [low, high] of the relative difference over paired bootstrap resamples, each end a
    one-sided bound at `confidence` (the 1 - confidence and the confidence quantiles; for FIDs
    centred on the value, as `centred_interval`).
    """

    name: str
    challenger: float
    champion: float
    relative: float
    interval: list[float]
    confidence: float


def check_same_images(challenger: Scores, champion: Scores) -> None:
    """ScoresError unless both were measured on the same test images with the same network."""
    if challenger.real.shape != champion.real.shape or len(challenger.samples) != len(champion.samples):
        raise ScoresError(
            f"the two evaluations hold {challenger.count} and {champion.count} test images, "
            f"{len(challenger.samples)} and {len(champion.samples)} samples: score both on one evaluation."
        )
    if not np.allclose(challenger.real, champion.real, rtol=1e-2, atol=1e-2):
        raise ScoresError(
            "the two evaluations' real test images have different Inception features: they were scored on "
            "other images or with another network; score both on one evaluation."
        )


def paired_objective(
    challenger: Scores, champion: Scores, objective: str, confidence: float, count: int, seed: int
) -> Difference:
    """The objective's relative difference, bootstrapped over the test images and the samples:
    each resample draws one set of image rows and one of sample rows, used for both models."""
    check_same_images(challenger, champion)
    check_confidence(confidence, "registry.min_confidence")
    ours = objective_value(objective, *challenger.fids())
    theirs = objective_value(objective, *champion.fids())
    images = resamples(challenger.count, count, seed)
    drawn = resamples(len(challenger.samples), count, seed + 1)
    replicates = []
    with threadpool_limits(1):  # small matrices: threads only contend
        for i, j in zip(images, drawn, strict=True):
            champion_value = objective_value(objective, *champion.fids(i, j))
            replicates.append((objective_value(objective, *challenger.fids(i, j)) - champion_value) / champion_value)
    relative = (ours - theirs) / theirs
    interval = centred_interval(relative, np.array(replicates), (1.0 - confidence, confidence))
    return Difference(objective, ours, theirs, relative, interval, confidence)


def paired_means(challenger: Scores, champion: Scores, confidence: float, count: int, seed: int) -> list[Difference]:
    """Each per-image metric both hold: the mean's relative difference over paired image resamples."""
    check_same_images(challenger, champion)
    images = resamples(challenger.count, count, seed)
    out = []
    for name in sorted(set(challenger.per_image) & set(champion.per_image)):
        ours, theirs = challenger.per_image[name], champion.per_image[name]
        scale = abs(float(theirs.mean())) or 1.0
        replicates = (ours[images].mean(axis=1) - theirs[images].mean(axis=1)) / scale
        low, high = np.quantile(replicates, [1.0 - confidence, confidence])
        mine, other = float(ours.mean()), float(theirs.mean())
        out.append(Difference(name, mine, other, (mine - other) / scale, [float(low), float(high)], confidence))
    return out
