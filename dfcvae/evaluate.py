"""Evaluation of a trained DFC-VAE: the cheap tuning objective and the full test-set report.

`tuning_objective` scores a model on the first `eval.val_subset` val images (shard order,
whatever the batch size): FID of reconstructions decode(mu) and of as many prior samples
(seed `eval.seed`) against those real images. An `Evaluator` keeps the Inception network and
the real images' statistics loaded between calls (a training run's validations).

`evaluate` measures on the first `eval.num_samples` test images (all, if fewer) and returns an
`Evaluation`; it writes nothing (pipeline/evaluate.py writes it into eval.out_dir and logs it).
Its numbers:
    test/mse, test/psnr, test/ssim      pixels on the [0, 1] scale, reconstructions decode(mu)
    test/lpips                          LPIPS v0.1 (eval.lpips_net, ImageNet backbone; with
                                        eval.lpips_weights random: test/lpips_random), per image
    test/reference_distance             sum over eval.reference_layers of 1/(2 C H W) ||Phi(x) - Phi(x_hat)||^2
                                        (eval.reference_*: one network for every model)
    test/fid_recon                      FID of the reconstructions against the real test images
    test/fid_samples                    FID of as many prior samples (seed eval.seed) against them,
                                        from eval.sampler; test/fid_samples_<s> for each sampler s
                                        (normal at eval.temperature, gmm: dfcvae/sampler.py)
    test/fid_sum                        the two added (eval.objective picks one of the three)
    test/fid_images                     images per FID set: FIDs compare only at the same count
                                        and Inception network (`test/fid_inception`)
    test/kid_recon, test/kid_samples    KID (Bińkowski et al. 2018) of the same features against the
                                        real images, unbiased at any size; _std: its spread over
                                        eval.kid_subsets subsets (dfcvae/uncertainty.py)
    test/<metric>_ci_low, _ci_high      the percentile bootstrap interval at eval.confidence of every
                                        per-image mean and FID (eval.bootstrap_resamples resamples of
                                        the test images and samples); metrics.json holds each as
                                        test/<metric>_ci: [low, high], with `confidence` and `fid_protocol`
    test/active_units, active_fraction  latent dimensions whose mean varies over the test images
                                        (var > 0.01, Burda et al. 2016): near 0 is a collapsed posterior
    test/nyquist_power, _real, _ratio   power of period-2 patterns (metrics.nyquist_power) in the
                                        reconstructions, the real images, and their ratio: > 1 is
                                        a checkerboard the model adds
    test/lattice_ratio_<p>              the reconstructions' high-pass energy peak by pixel phase
                                        (metrics.phase_energy, lattice_peak) over the real images',
                                        for p = 2 and each stride of perceptual.layers up to half
                                        the image; test/lattice_ratio: the largest. Over 1: a
                                        lattice fixed to the pixel grid (docs/quality.md)
    test/fid_samples_literature,        with eval.fid_protocol literature: FIDs under a published
    test/fid_recon_literature           CelebA-64 protocol (LITERATURE, Ghosh et al. 2020): the first
                                        10,000 test images against 10,000 samples of eval.sampler and
                                        against their reconstructions (test/fid_literature_images)
    test/probe_accuracy_mean            the paper's attribute probe on latent means (fit on up to
    test/probe_baseline_mean            eval.probe_train_samples train images), majority baseline;
    test/probe_{accuracy,baseline}/<A>  per attribute of eval.probe_attributes labelled in the data
                                        (`all`: CelebA's 40, the paper's table; attributes the data
                                        has no ground truth for are skipped, evaluation.json says)
beside what they are made of and what shows them:
    intervals         {metric: [low, high]}, the bootstrap intervals above
    scores            uncertainty.Scores as stored: per-image metrics and the Inception features of
                      the test images, reconstructions and samples; every number above comes from
                      them, and the registry's champion gate compares two models' scores image by image
    sampler           eval.sampler as fitted here (the registered model samples with it)
    probe             one result per probed attribute: accuracy, baseline; the skipped, with why
    details           how the numbers were made: Inception identity, image counts, seed, sampler,
                      the FID protocol, the picture layout, the wall time
    grids             PICTURES: per file, ([-1, 1] images (R C, 3, S, S), C columns), R rows of C:
      samples.png               SAMPLE_ROWS x SAMPLE_COLS prior samples (seed eval.seed, eval.sampler)
      reconstructions.png       2 x RECON_COLS: test images above their reconstructions
      interpolations.png        INTERP_PAIRS x INTERP_STEPS: from test image i to test image
                                INTERP_PAIRS + i in latent space, ends included
      attribute_arithmetic.png  (ARITHMETIC_ROWS x A) x len(ARITHMETIC_STRENGTHS): per attribute
                                of eval.arithmetic_attributes labelled in the data, test images
                                without it, decode(mu + s v), v = mean latent with the attribute
                                minus without (Hou et al. 2017's figure); s = 0 is the plain
                                reconstruction. Data without those labels: one block along the
                                latent means' first principal component (v = 2 std along it).
With fewer test images than a grid needs, reconstructions get fewer columns, and
interpolations and each attribute's block fewer rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from tqdm import tqdm

from dfcvae import features, metrics, pictures, uncertainty
from dfcvae.checkpoint import state_digest
from dfcvae.config import Config, ConfigError
from dfcvae.device import Runtime
from dfcvae.features import build_reference, resolve_layers
from dfcvae.loss import feature_distances_per_image
from dfcvae.lpips_metric import LPIPS
from dfcvae.model import DFCVAE
from dfcvae.sampler import GaussianMixtureSampler, NormalSampler, Sampler
from dfcvae.shards.format import ATTRIBUTE_NAMES, manifest_hash, read_manifest
from dfcvae.shards.loader import make_loader, prepare_batch
from dfcvae.uncertainty import Scores, objective_value

log = logging.getLogger(__name__)

PICTURES = ("samples.png", "reconstructions.png", "interpolations.png", "attribute_arithmetic.png")
SAMPLE_ROWS, SAMPLE_COLS = 8, 8
RECON_COLS = 8
INTERP_PAIRS, INTERP_STEPS = 4, 8
ARITHMETIC_ROWS = 4
ARITHMETIC_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
PICTURE_POOL = 64  # first test images kept for the pictures
PRINCIPAL_DIRECTION = "principal_component_1"
INCEPTION_CPU_BATCH = 25  # bounds Inception's activation memory at 299 px on CPU

# ---------------------------------------------------------------- models


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """no_grad and eval mode (BatchNorm running statistics) for the block, then the old mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- data in a fixed order


def iter_split(cfg: Config, split: str, limit: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The first `limit` images of `split` (all, if fewer) in shard order, in batches of eval.batch_size.

    Yields (uint8 (B, 3, H, W), int8 (B, 40) attributes). One loader stream, so the order is
    the shards' and does not depend on loader.num_workers or the batch size.
    """
    left = min(limit, split_count(cfg, split))
    ordered = cfg.with_overrides({"loader.num_workers": 1})
    for batch in make_loader(ordered, split, train=False, batch_size=cfg.eval.batch_size, num_workers=0):
        if left <= 0:
            break
        take = min(left, len(batch["image"]))  # the epoch's last batch wraps round to the start
        yield batch["image"][:take], batch["attrs"][:take]
        left -= take


def split_count(cfg: Config, split: str) -> int:
    return int(read_manifest(cfg)["splits"][split]["count"])


def read_split(cfg: Config, split: str, limit: int) -> tuple[Tensor, Tensor]:
    """iter_split concatenated: uint8 (N, 3, H, W), int8 (N, 40)."""
    images, attrs = zip(*iter_split(cfg, split, limit))
    return torch.cat(images), torch.cat(attrs)


def latent_means(
    model: DFCVAE, cfg: Config, split: str, limit: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """mu of the first `limit` images of `split`: float32 (N, latent_dim) on CPU, int8 (N, 40) attributes."""
    latents, attrs = [], []
    total = min(limit, split_count(cfg, split))
    with evaluation_mode(model), tqdm(total=total, desc=f"evaluate: encode {split}", unit="img") as bar:
        for images, batch_attrs in iter_split(cfg, split, limit):
            latents.append(model.encode(prepare_batch(images, device, train=False))[0].float().cpu())
            attrs.append(batch_attrs)
            bar.update(len(images))
    return torch.cat(latents), torch.cat(attrs)


# ---------------------------------------------------------------- FID pieces


def prior_features(
    model: DFCVAE,
    n: int,
    seed: int,
    batch_size: int,
    inception: metrics.InceptionFeatures,
    progress: bool = False,
    sampler: Sampler | None = None,
) -> NDArray[np.float64]:
    """Inception features (n, 2048) of n decoded codes from `sampler` (default z ~ N(0, I)); the
    codes are drawn at once on CPU from `seed`, so independent of batch size and device."""
    device = next(model.parameters()).device
    sampler = sampler or NormalSampler(model.latent_dim)
    z = sampler.sample(n, torch.Generator().manual_seed(seed))  # (n, latent)
    features = []
    what = f"evaluate: {sampler.kind} samples"
    with evaluation_mode(model), tqdm(total=n, desc=what, unit="img", disable=not progress) as bar:
        for chunk in z.split(batch_size):
            features.append(inception(model.decode(chunk.to(device)).float()))
            bar.update(len(chunk))
    return np.concatenate(features)


def lpips_key(cfg: Config) -> str:
    """lpips with ImageNet weights (comparable with published numbers), else lpips_<weights>."""
    weights = cfg.eval.lpips_weights
    return "lpips" if weights == "imagenet" else f"lpips_{'random' if weights == 'random' else 'file'}"


def build_samplers(cfg: Config, train_latents: Tensor) -> dict[str, Sampler]:
    """Every sampler (dfcvae/sampler.py): normal at eval.temperature, and the Gaussian mixture fit
    on `train_latents` (N, latent_dim)."""
    return {
        "normal": NormalSampler(train_latents.shape[1], cfg.eval.temperature),
        "gmm": GaussianMixtureSampler.fit(train_latents, cfg.eval.gmm_components, cfg.eval.seed),
    }


def check_settings(cfg: Config) -> None:
    """The eval settings that would otherwise fail late: the objective, the sampler and the
    attribute names."""
    objective_value(cfg.eval.objective, 0.0, 0.0)
    if ALL_ATTRIBUTES in cfg.eval.arithmetic_attributes:
        raise ConfigError("eval.arithmetic_attributes: name the attributes (`all` is for eval.probe_attributes).")
    NormalSampler(cfg.model.latent_dim, cfg.eval.temperature)
    attribute_columns(cfg.eval.probe_attributes)
    attribute_columns(cfg.eval.arithmetic_attributes)


# ---------------------------------------------------------------- the evaluator


class Evaluator:
    """What evaluation loads once and reuses: the FID Inception (per device and batch size) and
    the fixed val images with their Inception statistics (for one shard set at a time). Its
    holder decides how long they live: a training run's validations (the worker's objective),
    one evaluate stage, one benchmark. Calling it is `tuning_objective`.
    """

    def __init__(self) -> None:
        self._inception: dict[tuple[str, int], metrics.InceptionFeatures] = {}
        self._val_reference: tuple[tuple, tuple[Tensor, tuple[NDArray, NDArray]]] | None = None

    def __getstate__(self) -> dict:  # crosses to Ray workers empty: each loads its own
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def inception(self, device: torch.device | str, batch_size: int) -> metrics.InceptionFeatures:
        """The FID Inception on `device`, loaded on first use; on CPU at most INCEPTION_CPU_BATCH per batch."""
        device = torch.device(device)
        if device.type != "cuda":
            batch_size = min(batch_size, INCEPTION_CPU_BATCH)
        key = (str(device), batch_size)
        if key not in self._inception:
            self._inception[key] = metrics.InceptionFeatures(device=device, batch_size=batch_size)
        return self._inception[key]

    def val_reference(
        self, cfg: Config, inception: metrics.InceptionFeatures
    ) -> tuple[Tensor, tuple[NDArray, NDArray]]:
        """The first eval.val_subset val images (uint8, CPU) and their Inception statistics."""
        key = (manifest_hash(cfg), cfg.data.image_size, cfg.eval.val_subset, str(inception.device))
        if self._val_reference is None or self._val_reference[0] != key:
            images, _ = read_split(cfg, "val", cfg.eval.val_subset)
            self._val_reference = key, (images, metrics.feature_statistics(inception(images)))
        return self._val_reference[1]

    def tuning_objective(self, model: DFCVAE, cfg: Config, device: torch.device | str) -> dict[str, float]:
        """FIDs on the first eval.val_subset val images; lower is better.

        -> {"val/fid_recon", "val/fid_samples", "val/fid_sum", "val/objective"}, the last being
        eval.objective's. Deterministic for a model and config; leaves the model's mode as it was.
        """
        objective_value(cfg.eval.objective, 0.0, 0.0)  # a misspelt objective fails before any work
        inception = self.inception(device, cfg.eval.batch_size)
        images, real = self.val_reference(cfg, inception)
        recon = []
        with evaluation_mode(model):
            for chunk in images.split(cfg.eval.batch_size):
                x = prepare_batch(chunk, device, train=False)
                recon.append(inception(model.decode(model.encode(x)[0]).float()))
        samples = prior_features(model, len(images), cfg.eval.seed, cfg.eval.batch_size, inception)
        fid_recon = metrics.frechet_distance(*real, *metrics.feature_statistics(np.concatenate(recon)))
        fid_samples = metrics.frechet_distance(*real, *metrics.feature_statistics(samples))
        return {
            "val/fid_recon": fid_recon,
            "val/fid_samples": fid_samples,
            "val/fid_sum": fid_recon + fid_samples,
            "val/objective": objective_value(cfg.eval.objective, fid_recon, fid_samples),
        }

    __call__ = tuning_objective

    def evaluate(self, model: DFCVAE, cfg: Config, device: torch.device | str) -> Evaluation:
        """The full evaluation (module docstring); nothing is written.

        Raises ConfigError for unknown eval settings or a test split under 2 images.
        """
        check_settings(cfg)
        return _evaluate(model, cfg, device, self.inception(device, cfg.eval.batch_size))


def evaluation_config(params: Config, trained: Config) -> Config:
    """params.yaml with the model section it was trained with; the image sizes must agree
    (ConfigError otherwise)."""
    if trained.data.image_size != params.data.image_size:
        raise ConfigError(
            f"the model was trained on {trained.data.image_size} px images but data.image_size is "
            f"{params.data.image_size}: evaluate with the params it was trained with, or retrain."
        )
    return params.with_overrides({f"model.{k}": v for k, v in trained.to_dict()["model"].items()})


def tuning_objective(model: DFCVAE, cfg: Config, device: torch.device | str) -> dict[str, float]:
    """`Evaluator.tuning_objective` with a fresh evaluator (nothing kept after the call)."""
    return Evaluator().tuning_objective(model, cfg, device)


def evaluate(model: DFCVAE, cfg: Config, device: torch.device | str) -> Evaluation:
    """`Evaluator.evaluate` with a fresh evaluator (nothing kept after the call)."""
    return Evaluator().evaluate(model, cfg, device)


# ---------------------------------------------------------------- the attribute probe


ALL_ATTRIBUTES = "all"  # eval.probe_attributes: all = CelebA's 40, the paper's probe


def probe_names(names: tuple[str, ...] | list[str]) -> list[str]:
    """eval.probe_attributes as names: `all` is every one of CelebA's 40 attributes."""
    return list(ATTRIBUTE_NAMES) if list(names) == [ALL_ATTRIBUTES] else list(names)


def ground_truth(cfg: Config) -> set[str] | None:
    """The attributes the shards really label: synthetic faces only those drawn by construction,
    a folder of images none; None when the manifest does not say (all of them, as CelebA)."""
    manifest = read_manifest(cfg)
    drawn = manifest.get("dataset", {}).get("attributes_by_construction")
    if drawn is not None:
        return set(drawn)
    return set(manifest["attributes"]) if "attributes" in manifest else None


def attribute_columns(names: tuple[str, ...] | list[str]) -> list[int]:
    names = probe_names(names)
    unknown = [n for n in names if n not in ATTRIBUTE_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown attribute {unknown[0]!r} in eval settings; CelebA's names are: {', '.join(ATTRIBUTE_NAMES)}."
        )
    return [ATTRIBUTE_NAMES.index(n) for n in names]


def probe_latents(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    names: tuple[str, ...] | list[str],
    labelled: set[str] | None = None,
) -> dict[str, Any]:
    """metrics.attribute_probe on the named attributes (`all`: CelebA's 40) that the data labels
    (in `labelled` when given, no -1) with both classes in train.

    train, test: (latents (N, D), attributes int8 (N, 40)). Returns attribute_probe's dict;
    attributes left out are in "skipped" with the reason and not in the means, which are None
    when none is probed.
    """
    (x_train, a_train), (x_test, a_test) = train, test
    names = probe_names(names)
    usable, skipped = [], {}
    for name, col in zip(names, attribute_columns(names)):
        if labelled is not None and name not in labelled:
            skipped[name] = "no ground truth in this data"
        elif (a_train[:, col] < 0).any() or (a_test[:, col] < 0).any():
            skipped[name] = "not labelled in the data"
        elif len(torch.unique(a_train[:, col])) < 2:
            skipped[name] = f"only class {int(a_train[0, col])} in train"
        else:
            usable.append(name)
    if not usable:
        return {"attributes": {}, "mean_accuracy": None, "mean_baseline": None, "skipped": skipped}
    cols = attribute_columns(usable)
    result = metrics.attribute_probe(x_train, a_train[:, cols].numpy(), x_test, a_test[:, cols].numpy(), usable)
    result["skipped"] = {**skipped, **result["skipped"]}
    return result


def run_probe(model: DFCVAE, cfg: Config, device: torch.device | str) -> dict[str, Any]:
    """The attribute probe alone: eval.probe_train_samples train and eval.num_samples test latent means."""
    train = latent_means(model, cfg, "train", cfg.eval.probe_train_samples, device)
    test = latent_means(model, cfg, "test", cfg.eval.num_samples, device)
    return probe_latents(train, test, cfg.eval.probe_attributes, ground_truth(cfg))


# ---------------------------------------------------------------- pictures


def principal_direction(latents: Tensor) -> Tensor:
    """The latent means' first principal axis, scaled to 2 standard deviations along it: (D,)."""
    centred = latents - latents.mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    std = singular[0] / math.sqrt(max(len(latents) - 1, 1))
    return (2.0 * std * vh[0]).to(latents.dtype)


def arithmetic_directions(names: tuple[str, ...], train_latents: Tensor, train_attrs: Tensor) -> dict[str, Tensor]:
    """name -> attribute vector for the named attributes labelled with both classes in train."""
    vectors = {}
    for name, col in zip(names, attribute_columns(names)):
        column = train_attrs[:, col]
        if (column >= 0).all() and len(torch.unique(column)) == 2:
            vectors[name] = pictures.attribute_vector(train_latents, train_attrs, col)
    return vectors


Grids = dict[str, tuple[Tensor, int]]  # PICTURES file name -> ([-1, 1] images (N, 3, S, S), columns)


def picture_grids(
    model: DFCVAE,
    cfg: Config,
    pool: tuple[Tensor, Tensor],
    train: tuple[Tensor, Tensor],
    sampler: Sampler | None = None,
) -> tuple[Grids, dict[str, dict[str, Any]]]:
    """The PICTURES from test images `pool` (uint8, int8 attrs) and train latent means, samples
    from `sampler` (default N(0, I)); -> (the grids, their layout per file: rows, cols, image_size
    and, for attribute_arithmetic.png, the directions)."""
    images, attrs = pool
    x = prepare_batch(images, "cpu", train=False).contiguous()  # (P, 3, H, W) in [-1, 1]
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    pairs = min(INTERP_PAIRS, len(x) // 2)
    n = SAMPLE_ROWS * SAMPLE_COLS
    z = (sampler or NormalSampler(model.latent_dim)).sample(n, generator)
    grids = {
        "samples.png": pictures.sample_grid(model, n, generator, nrow=SAMPLE_COLS, z=z),
        "reconstructions.png": pictures.reconstruction_grid(model, x[:RECON_COLS]),
        "interpolations.png": pictures.interpolation_grid(model, x[:pairs], x[pairs : 2 * pairs], INTERP_STEPS),
    }
    directions = arithmetic_directions(cfg.eval.arithmetic_attributes, *train)
    if not directions:
        log.warning(
            "none of eval.arithmetic_attributes %s is labelled in the data: attribute_arithmetic.png "
            "follows the latent means' first principal component instead.",
            list(cfg.eval.arithmetic_attributes),
        )
        directions = {PRINCIPAL_DIRECTION: principal_direction(train[0])}
    blocks = []
    for name, vector in directions.items():
        rows = _rows_without(attrs, name)
        blocks.append(pictures.attribute_arithmetic_grid(model, x[rows], vector, ARITHMETIC_STRENGTHS)[0])
    grids["attribute_arithmetic.png"] = (torch.cat(blocks), len(ARITHMETIC_STRENGTHS))
    layout = {}
    for name, (grid, cols) in grids.items():
        cols = min(cols, len(grid))
        layout[name] = {"rows": math.ceil(len(grid) / cols), "cols": cols, "image_size": int(x.shape[-1])}
    layout["attribute_arithmetic.png"]["directions"] = list(directions)
    return grids, layout


def _rows_without(attrs: Tensor, name: str) -> list[int]:
    """ARITHMETIC_ROWS pool indices, those without attribute `name` first (in order)."""
    if name in ATTRIBUTE_NAMES:
        has = attrs[:, ATTRIBUTE_NAMES.index(name)] == 1
        order = [i for i in range(len(attrs)) if not has[i]] + [i for i in range(len(attrs)) if has[i]]
    else:
        order = list(range(len(attrs)))
    return order[:ARITHMETIC_ROWS]


# ---------------------------------------------------------------- the test-set report


@dataclass
class Measurements:
    """What one pass over the test images gathers."""

    count: int
    # (N,) each: mse, psnr, ssim, reference_distance, lpips, nyquist_power(_real)
    per_image: dict[str, NDArray[np.float64]]
    real: NDArray[np.float64]  # (N, 2048) Inception features of the test images
    recon: NDArray[np.float64]  # (N, 2048) of their reconstructions
    latents: Tensor  # (N, latent_dim) float32, CPU
    attrs: Tensor  # (N, 40) int8
    pool: tuple[Tensor, Tensor]  # the first PICTURE_POOL images (uint8) and their attributes
    phases: dict[int, tuple[Tensor, Tensor]]  # period -> metrics.phase_energy of (reconstructions, real images)

    @property
    def means(self) -> dict[str, float]:
        return {name: float(values.mean()) for name, values in self.per_image.items()}


# Per-image metrics of a reconstruction, each (B,) float64.
RECONSTRUCTION_METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": metrics.mse_per_image,
    "psnr": metrics.psnr_per_image,
    "ssim": metrics.ssim_per_image,
}
NOT_SCORED = ("nyquist_power", "nyquist_power_real")  # compared as a ratio of means, not per image


def measure_test_split(
    model: DFCVAE, cfg: Config, device: torch.device | str, inception: metrics.InceptionFeatures
) -> Measurements:
    """Per-image reconstruction metrics, Inception features and latent means of the first
    eval.num_samples test images."""
    reference = build_reference(cfg, Runtime(torch.device(device)))
    lpips = LPIPS(cfg.eval.lpips_net, cfg.eval.lpips_weights).to(device)
    total = min(cfg.eval.num_samples, split_count(cfg, "test"))
    if total < 2:
        raise ConfigError(f"the test split has {total} images; evaluation needs at least 2: re-shard with more data.")
    names = [*RECONSTRUCTION_METRICS, "reference_distance", lpips_key(cfg), *NOT_SCORED]
    values: dict[str, list[Tensor]] = {name: [] for name in names}
    real, recon = [], []
    latents, attrs, pool = [], [], []
    phases = {p: (0.0, 0.0) for p in features.lattice_periods(cfg)}
    with evaluation_mode(model), tqdm(total=total, desc="evaluate: test", unit="img") as bar:
        for images, batch_attrs in iter_split(cfg, "test", cfg.eval.num_samples):
            x = prepare_batch(images, device, train=False)
            mu, _ = model.encode(x)
            x_hat = model.decode(mu).float()
            for name, metric in RECONSTRUCTION_METRICS.items():
                values[name].append(metric(x, x_hat).cpu())
            values["reference_distance"].append(feature_distances_per_image(reference(x), reference(x_hat)).cpu())
            values["nyquist_power"].append(metrics.nyquist_power(x_hat).cpu())
            values["nyquist_power_real"].append(metrics.nyquist_power(x).cpu())
            values[lpips_key(cfg)].append(lpips(x, x_hat).double().flatten().cpu())
            for period, (ours, theirs) in phases.items():
                phases[period] = (ours + metrics.phase_energy(x_hat, period), theirs + metrics.phase_energy(x, period))
            real.append(inception(images))
            recon.append(inception(x_hat))
            latents.append(mu.float().cpu())
            attrs.append(batch_attrs)
            if sum(map(len, pool)) < PICTURE_POOL:
                pool.append(images[: PICTURE_POOL - sum(map(len, pool))])
            bar.update(len(x))
    all_attrs = torch.cat(attrs)
    return Measurements(
        count=total,
        per_image={name: torch.cat(parts).double().numpy() for name, parts in values.items()},
        real=np.concatenate(real),
        recon=np.concatenate(recon),
        latents=torch.cat(latents),
        attrs=all_attrs,
        pool=(torch.cat(pool), all_attrs[:PICTURE_POOL]),
        phases=phases,
    )


# The literature protocol (eval.fid_protocol: literature), as the code of Ghosh et al., "From
# Variational to Deterministic Autoencoders", ICLR 2020 (arXiv:1903.12436) computes its CelebA FIDs
# (github.com/ParthaEth/Regularized_autoencoders-RAE-: my_utility/fid_from_dir_computer.py takes
# the first 10,000 test images as the reference, interpolation_fid_and_viz.py decodes 10,000 samples).
LITERATURE = {
    "source": "Ghosh et al. 2020 (RAE), arXiv:1903.12436",
    "real_images": 10_000,
    "generated_images": 10_000,
}


def literature_fids(
    model: DFCVAE,
    cfg: Config,
    device: torch.device | str,
    inception: metrics.InceptionFeatures,
    sampler: Sampler,
    test: Measurements,
) -> dict[str, float]:
    """FIDs under LITERATURE: the first real_images test images (all, if fewer) against
    generated_images samples of `sampler` (seed eval.seed) and against the images' reconstructions
    decode(mu). The test split's features already measured are reused when they cover those images."""
    count = min(LITERATURE["real_images"], split_count(cfg, "test"))
    if test.count >= count:
        real, recon = test.real[:count], test.recon[:count]
    else:
        parts: tuple[list, list] = ([], [])
        with evaluation_mode(model), tqdm(total=count, desc="evaluate: literature test", unit="img") as bar:
            for images, _ in iter_split(cfg, "test", count):
                x = prepare_batch(images, device, train=False)
                parts[0].append(inception(images))
                parts[1].append(inception(model.decode(model.encode(x)[0]).float()))
                bar.update(len(x))
        real, recon = np.concatenate(parts[0]), np.concatenate(parts[1])
    n = LITERATURE["generated_images"]
    samples = prior_features(model, n, cfg.eval.seed, cfg.eval.batch_size, inception, True, sampler)
    return {
        "test/fid_samples_literature": uncertainty.fid_from_features(real, samples),
        "test/fid_recon_literature": uncertainty.fid_from_features(real, recon),
        "test/fid_literature_images": float(count),
    }


def fid_protocol(cfg: Config, inception: metrics.InceptionFeatures, count: int) -> dict[str, Any]:
    """What an FID depends on besides the model: numbers measured under different protocols do
    not compare (the registry scores the champion again instead)."""
    return {
        "inception": inception.identity,
        "real_images": count,
        "generated_images": count,
        "split": "test",
        "manifest_hash": manifest_hash(cfg),
        "image_size": cfg.data.image_size,
        "resize": f"{cfg.data.image_size} px to {metrics.INCEPTION_SIZE[0]} px, TensorFlow's bilinear (resize_like_tf)",
        "sampler": cfg.eval.sampler,
        "temperature": cfg.eval.temperature,
        "gmm_components": cfg.eval.gmm_components,
        "seed": cfg.eval.seed,
        "feature_dtype": np.dtype(uncertainty.FEATURE_DTYPE).name,
        "literature": LITERATURE if cfg.eval.fid_protocol == "literature" else None,
    }


@dataclass(frozen=True)
class Evaluation:
    """One full evaluation (module docstring), held in memory; pipeline/evaluate.py writes it."""

    numbers: dict[str, float]  # test/<metric> (module docstring), without the intervals
    objective: float  # eval.objective's value (details["objective"] names it)
    intervals: dict[str, list[float]]  # <metric> -> [low, high] at eval.confidence
    inception: str  # the FID Inception's identity (metrics.InceptionFeatures.identity)
    scores: Scores  # as stored: every number comes from them
    sampler: Sampler  # eval.sampler as fitted on the train latent means
    probe: dict[str, Any]  # probe_latents' result
    grids: Grids  # PICTURES
    details: dict[str, Any]  # how the numbers were made

    def flat(self) -> dict[str, Any]:
        """The numbers as metrics: the intervals as test/<metric>_ci_low and _ci_high, plus the
        string test/fid_inception."""
        return self.numbers | intervals_as_numbers(self.intervals) | {"test/fid_inception": self.inception}

    def metrics_record(self) -> dict[str, Any]:
        """metrics.json: the numbers as floats, the objective under its own name, each interval as
        test/<metric>_ci: [low, high], the confidence and the FID protocol."""
        numbers = {k: float(v) for k, v in self.numbers.items()} | {self.details["objective"]: float(self.objective)}
        intervals = {f"test/{k}_ci": v for k, v in self.intervals.items()}
        protocol = self.details["fid_protocol"]
        return numbers | intervals | {"confidence": self.details["bootstrap"]["confidence"], "fid_protocol": protocol}

    def probe_rows(self) -> list[dict[str, Any]]:
        """One row per probed attribute: attribute, accuracy, baseline."""
        return [{"attribute": k, **v} for k, v in self.probe["attributes"].items()]


def _evaluate(
    model: DFCVAE, cfg: Config, device: torch.device | str, inception: metrics.InceptionFeatures
) -> Evaluation:
    start = time.perf_counter()
    test = measure_test_split(model, cfg, device, inception)
    train = latent_means(model, cfg, "train", cfg.eval.probe_train_samples, device)
    samplers = build_samplers(cfg, train[0])
    drawn = {  # the same count and seed for each sampler
        name: prior_features(model, test.count, cfg.eval.seed, cfg.eval.batch_size, inception, True, sampler)
        for name, sampler in samplers.items()
    }
    scored = {k: v for k, v in test.per_image.items() if k not in NOT_SCORED}
    # Every number below comes from the scores as stored, as the registry's gate will read them.
    scores = Scores(scored, test.real, test.recon, drawn[cfg.eval.sampler]).as_stored()
    fid_recon, fid_samples = scores.fids()
    probe = probe_latents(train, (test.latents, test.attrs), cfg.eval.probe_attributes, ground_truth(cfg))
    grids, layout = picture_grids(model, cfg, test.pool, train, samplers[cfg.eval.sampler])

    numbers: dict[str, float] = {f"test/{k}": v for k, v in test.means.items()}
    numbers |= {"test/fid_recon": fid_recon, "test/fid_samples": fid_samples, "test/fid_sum": fid_recon + fid_samples}
    for name, sampled in drawn.items():  # eval.sampler's is fid_samples, from the stored scores
        if name == cfg.eval.sampler:
            numbers[f"test/fid_samples_{name}"] = fid_samples
        else:
            rounded = sampled.astype(uncertainty.FEATURE_DTYPE)  # as the stored features are
            numbers[f"test/fid_samples_{name}"] = uncertainty.fid_from_features(scores.real, rounded)
    numbers["test/fid_images"] = test.count
    for name, fake in (("recon", scores.recon), ("samples", scores.samples)):
        kid = uncertainty.kid(scores.real, fake, cfg.eval.kid_subset_size, cfg.eval.kid_subsets, cfg.eval.seed)
        numbers[f"test/kid_{name}"], numbers[f"test/kid_{name}_std"] = kid
    numbers |= collapse_and_checkerboard(test)
    numbers |= probe_metrics(probe)
    intervals = uncertainty.intervals(scores, cfg.eval.confidence, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    seconds = {"evaluation": time.perf_counter() - start}
    if cfg.eval.fid_protocol == "literature":
        start = time.perf_counter()
        numbers |= literature_fids(model, cfg, device, inception, samplers[cfg.eval.sampler], test)
        seconds["literature_fids"] = time.perf_counter() - start
    protocol = fid_protocol(cfg, inception, test.count)
    details = {
        "inception": inception.identity,
        "model_sha256": state_digest(model.state_dict()),  # which weights these numbers belong to
        "fid_images": test.count,
        "fid_prior_samples": test.count,
        "fid_protocol": protocol,
        "sampler": cfg.eval.sampler,
        "temperature": cfg.eval.temperature,
        "gmm_components": len(samplers["gmm"].weights) if "gmm" in samplers else None,
        "seed": cfg.eval.seed,
        "objective": cfg.eval.objective,
        "bootstrap": {"confidence": cfg.eval.confidence, "resamples": cfg.eval.bootstrap_resamples},
        "lpips": {"net": cfg.eval.lpips_net, "weights": cfg.eval.lpips_weights},
        "reference": {
            "backbone": cfg.eval.reference_backbone,
            "weights": cfg.eval.reference_weights,
            "layers": list(resolve_layers(cfg.eval.reference_backbone, cfg.eval.reference_layers)),
        },
        "probe_train_images": len(train[0]),
        "probe_skipped": probe["skipped"],
        "pictures": layout,
        "seconds": seconds,  # wall time: the evaluation without the literature FIDs, and those
    }
    return Evaluation(
        numbers=numbers,
        objective=objective_value(cfg.eval.objective, fid_recon, fid_samples),
        intervals=intervals,
        inception=inception.identity,
        scores=scores,
        sampler=samplers[cfg.eval.sampler],
        probe=probe,
        grids=grids,
        details=details,
    )


def intervals_as_numbers(intervals: dict[str, list[float]]) -> dict[str, float]:
    """{metric: [low, high]} -> {test/<metric>_ci_low, test/<metric>_ci_high}: MLflow metrics are numbers."""
    return {f"test/{k}_ci_{end}": v[i] for k, v in intervals.items() for i, end in enumerate(("low", "high"))}


def collapse_and_checkerboard(test: Measurements) -> dict[str, float]:
    """Active latent units over the test latent means, the reconstructions' Nyquist power against
    the real images' (test/nyquist_ratio > 1: the model adds a checkerboard), and their lattice
    peaks against the real images' per period (test/lattice_ratio_<p>; test/lattice_ratio, the
    largest: over 1, a lattice the model draws at fixed positions)."""
    units = metrics.active_units(test.latents)
    ratio = test.means["nyquist_power"] / max(test.means["nyquist_power_real"], 1e-30)
    lattice = {
        f"test/lattice_ratio_{period}": metrics.lattice_ratio(ours, theirs)
        for period, (ours, theirs) in test.phases.items()
    }
    return {
        "test/active_units": units,
        "test/active_fraction": units / test.latents.shape[1],
        "test/nyquist_ratio": ratio,
        **lattice,
        "test/lattice_ratio": max(lattice.values()),
    }


def probe_metrics(probe: dict[str, Any]) -> dict[str, float]:
    if not probe["attributes"]:
        return {}
    out = {"test/probe_accuracy_mean": probe["mean_accuracy"], "test/probe_baseline_mean": probe["mean_baseline"]}
    for name, result in probe["attributes"].items():
        out[f"test/probe_accuracy/{name}"] = result["accuracy"]
        out[f"test/probe_baseline/{name}"] = result["baseline"]
    return out
