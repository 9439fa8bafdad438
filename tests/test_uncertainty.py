"""Bootstrap intervals, FID and KID from stored features, the paired comparison (dfcvae/uncertainty.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dfcvae import metrics
from dfcvae.uncertainty import (
    FEATURE_DTYPE,
    GramFID,
    Scores,
    ScoresError,
    fid_from_features,
    intervals,
    kid,
    paired_means,
    paired_objective,
    percentile_interval,
    resamples,
)


def features(n: int, d: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """Non-negative, skewed, correlated features like Inception's pool3 averages."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
    return np.abs(rng.gamma(2.0, 0.3, size=(n, d)) @ mixing) + shift


def scores(n: int = 120, d: int = 64, recon_shift: float = 0.1, sample_shift: float = 0.2, seed: int = 0) -> Scores:
    real = features(n, d, seed=1000)
    rng = np.random.default_rng(seed)
    return Scores(
        per_image={"psnr": 20 + rng.normal(size=n) - 10 * recon_shift},
        real=real,
        recon=real + recon_shift + 0.05 * features(n, d, seed=seed + 1),
        samples=features(n, d, sample_shift, seed=seed + 2),
    )


@pytest.mark.parametrize("n", [50, 300])  # fewer images than dimensions (image space), and more
def test_fid_from_features_equals_the_moment_formula(n):
    x, y = features(n, 200, seed=1), features(n + 7, 200, 0.05, seed=2)
    expected = metrics.frechet_distance(*metrics.feature_statistics(x), *metrics.feature_statistics(y))
    assert fid_from_features(x, y) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_resampled_fids_from_gram_matrices_equal_the_direct_ones():
    x, y = features(60, 300, seed=1), features(50, 300, 0.05, seed=2)
    gram = GramFID(x, y)
    rng = np.random.default_rng(0)
    for _ in range(5):
        i, j = rng.integers(0, 60, 60), rng.integers(0, 50, 50)
        assert gram(i, j) == pytest.approx(fid_from_features(x[i], y[j]), rel=1e-7)


def test_float16_features_move_fid_by_under_a_hundredth_of_a_percent():
    x, y = features(120, 2048, seed=1) * 3, features(120, 2048, 0.02, seed=2) * 3
    exact = fid_from_features(x, y)
    rounded = fid_from_features(x.astype(FEATURE_DTYPE), y.astype(FEATURE_DTYPE))
    assert abs(rounded - exact) / exact < 1e-4


def test_kid_is_unbiased_where_fid_is_not():
    """Sets drawn from one distribution: FID is positive at small sizes, KID averages to 0."""
    draws = [(features(40, 16, seed=2 * i), features(40, 16, seed=2 * i + 1)) for i in range(40)]
    kids = np.array([kid(x, y, 20, 10, i)[0] for i, (x, y) in enumerate(draws)])
    fids = np.array([fid_from_features(x, y) for x, y in draws])
    assert (fids > 0).all()
    assert abs(kids.mean()) < 3 * kids.std(ddof=1) / np.sqrt(len(kids))  # 0 within its standard error
    shifted = kid(features(40, 16, seed=1), features(40, 16, 0.3, seed=2), 20, 10, 0)
    assert shifted[0] > kids.max() and shifted[1] > 0  # a real difference, and a spread over subsets
    with pytest.raises(ValueError, match="at least 4 images"):
        kid(features(3, 16), features(40, 16), 20, 10, 0)


def test_bootstrap_intervals_cover_the_true_mean_at_their_confidence():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        values = rng.exponential(size=60)  # skewed, true mean 1
        low, high = percentile_interval(values[resamples(60, 400, int(rng.integers(1 << 30)))].mean(axis=1), 0.9)
        covered += low <= 1.0 <= high
    assert 0.82 <= covered / 200 <= 0.97  # 90% nominal; the percentile bootstrap runs a little under at n = 60


def test_every_interval_holds_its_value_and_narrows_with_more_images():
    small, large = scores(n=40), scores(n=400, seed=1)
    narrow = intervals(large, 0.95, 200, 0)
    wide = intervals(small, 0.95, 200, 0)
    recon, samples = small.fids()
    for name, value in {"fid_recon": recon, "fid_samples": samples, "psnr": small.per_image["psnr"].mean()}.items():
        low, high = wide[name]
        assert low <= value <= high, name
        assert narrow[name][1] - narrow[name][0] < high - low, name
    assert wide["fid_sum"][0] <= recon + samples <= wide["fid_sum"][1]
    # Why FID intervals are centred: resamples repeat images, and plain percentiles sit above the value.
    drawn = resamples(len(small.samples), 200, 1)
    replicates = [small.fids(i, j)[1] for i, j in zip(resamples(small.count, 200, 0), drawn, strict=True)]
    assert percentile_interval(np.array(replicates), 0.95)[0] > samples


def test_a_paired_comparison_sees_a_real_difference_and_not_a_copy():
    champion = scores(recon_shift=0.1)
    same = paired_objective(champion, champion, "fid_sum", 0.95, 200, 0)
    assert same.relative == 0 and same.interval == [0.0, 0.0]
    better = paired_objective(scores(recon_shift=0.02, sample_shift=0.1, seed=5), champion, "fid_sum", 0.95, 200, 0)
    assert better.relative < 0 and better.interval[1] < 0 and better.challenger < better.champion
    (psnr,) = paired_means(scores(recon_shift=0.02, seed=5), champion, 0.95, 200, 0)
    assert psnr.name == "psnr" and psnr.relative > 0 and psnr.interval[0] > 0
    other_images = Scores(champion.per_image, champion.real + 1, champion.recon, champion.samples)
    with pytest.raises(ScoresError, match="different Inception features"):
        paired_objective(other_images, champion, "fid_sum", 0.95, 10, 0)
    with pytest.raises(ScoresError, match="hold 40 and 120 test images"):
        paired_objective(scores(n=40), champion, "fid_sum", 0.95, 10, 0)
    with pytest.raises(ValueError, match="registry.min_confidence is 1.5"):
        paired_objective(champion, champion, "fid_sum", 1.5, 10, 0)


def test_scores_files_round_trip_and_foreign_files_are_refused(tmp_path):
    original = scores(n=20, d=8)
    loaded = Scores.load(original.save(tmp_path / "scores.npz"))
    assert loaded.real.dtype == FEATURE_DTYPE and loaded.per_image["psnr"].dtype == np.float64
    np.testing.assert_array_equal(loaded.per_image["psnr"], original.per_image["psnr"])
    np.testing.assert_array_equal(loaded.recon, original.recon.astype(FEATURE_DTYPE))
    (tmp_path / "text.npz").write_text("not an array file")
    with pytest.raises(ScoresError, match="is not an evaluation's scores file"):
        Scores.load(tmp_path / "text.npz")
    np.savez(tmp_path / "pickled.npz", features_real=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ScoresError, match="is not an evaluation's scores file"):
        Scores.load(tmp_path / "pickled.npz")
    np.savez(tmp_path / "partial.npz", features_real=np.zeros((2, 2)))
    with pytest.raises(ScoresError, match="lacks features_recon, features_samples"):
        Scores.load(tmp_path / "partial.npz")
    with pytest.raises(ScoresError, match="one value for each of the 20 images"):
        Scores({"psnr": np.zeros(3)}, original.real, original.recon, original.samples)
