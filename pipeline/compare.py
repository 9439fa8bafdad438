"""Plain VAE vs DFC-VAE on the same shards: the same model, seeds, data order and steps, two losses.

    python -m pipeline.compare [--params params.yaml] [--set key=value ...] [--steps N] [--seeds N]
                               [--plain-kl-weight W] [--out-dir outputs/compare]

Trains both variants with the train stage (Ray Train, tracked in MLflow, run tags
`compare.variant` and `compare.seed`) and evaluates both with the evaluate stage's evaluation
(the same Inception network and test images), one run after another (runs that share a machine
would slow each other), seed by seed: seeds train.seed, train.seed + 1, ... (--seeds, default 1).
A seed sets the initial weights and the data order, the same for both variants, so the runs pair
by seed. Per metric the comparison gives each variant's mean over seeds with its 95% t interval,
and the verdict on the paired differences (DFC-VAE minus plain VAE, a paired t interval at 95%):
"DFC-VAE lower with 95% confidence", "DFC-VAE higher with 95% confidence" or "no difference
shown" (one seed shows none):

    dfc_vae    the workspace config, with the tune stage's best overrides when they exist
    plain_vae  the same with loss.perceptual_weight 0 and loss.pixel_weight 1: the usual
               Gaussian-decoder VAE, -ELBO = sum over pixels (x - x_hat)^2 + KL (a fixed
               decoder variance of 1/2 on the [-1, 1] scale). The project's pixel term is a
               mean over D = 3 H W values, so that loss is kl_weight = 1/D with pixel_weight 1
               (`plain_kl_weight`; --plain-kl-weight sets another). The DFC-VAE's kl_weight is
               relative to a mean over feature elements and is not carried over: with it, the
               pixel VAE would be a strongly weighted beta-VAE, a different model.

Outputs (--out-dir):
    <variant>/seed<s>/{train,ray,eval}   each run's train and evaluate outputs
    comparison.json    runs: per variant, one row per seed: FIDs (samples, recon), KIDs, PSNR, SSIM,
                       MSE, probe accuracy and baseline, reference distance, steps, loss settings
                       and the decoder (model.upsample),
                       the MLflow run, the shards' manifest hash, Inception identity and image
                       count, wall times; variants: per variant and metric the mean over seeds and
                       its interval; verdicts: per metric the paired difference, its interval and
                       the verdict
    comparison.md      the numbers as a markdown table
    reconstructions.png  RECON_COLS test images (top row), then each variant's decode(mu) (first seed),
                       one row per variant, a LABEL_WIDTH px label column on the left:
                       LABEL_WIDTH + C (S + 2) + 2 px wide, 3 (S + 2) + 2 px high (`figure_sizes`)
    samples.png        SAMPLE_ROWS x SAMPLE_COLS prior samples per variant from the same z
                       (seed eval.seed), panels side by side PANEL_GAP px apart under a
                       LABEL_HEIGHT px label: 2 (C (S + 2) + 2) + PANEL_GAP wide,
                       LABEL_HEIGHT + R (S + 2) + 2 high
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from dfcvae import evaluate, pictures, tracking
from dfcvae.checkpoint import load_checkpoint, model_from_state
from dfcvae.config import Config, ConfigError
from dfcvae.files import write_json
from dfcvae.shards.format import manifest_hash
from dfcvae.shards.loader import prepare_batch
from dfcvae.train import train
from pipeline.common import best_overrides, command, parse_config
from pipeline.evaluate import evaluate_trained

VARIANTS = ("plain_vae", "dfc_vae")  # row order of the pictures and the table
LABELS = {"plain_vae": "plain VAE", "dfc_vae": "DFC-VAE"}
RECON_COLS = 8
SAMPLE_ROWS, SAMPLE_COLS = 4, 4
LABEL_WIDTH = 96  # px, the label column of reconstructions.png
LABEL_HEIGHT = 22  # px, the label strip above each panel of samples.png
PANEL_GAP = 12  # px between the two sample panels
MEASURED = (  # comparison.json key, table label, format: measured per run, summarised over seeds
    ("fid_samples", "FID prior samples (lower is better)", "{:.1f}"),
    ("fid_recon", "FID reconstructions (lower is better)", "{:.1f}"),
    ("kid_samples", "KID prior samples (lower is better)", "{:.4f}"),
    ("kid_recon", "KID reconstructions (lower is better)", "{:.4f}"),
    ("psnr", "PSNR dB (higher is better)", "{:.2f}"),
    ("ssim", "SSIM (higher is better)", "{:.3f}"),
    ("mse", "MSE, [0, 1] scale (lower is better)", "{:.4f}"),
    ("reference_distance", "reference feature distance (lower is better)", "{:.3f}"),
    ("nyquist_ratio", "Nyquist power, reconstructions / real (over 1: a checkerboard)", "{:.2f}"),
    ("lattice_ratio", "lattice peak, reconstructions / real, worst period (over 1: a lattice)", "{:.2f}"),
    ("active_fraction", "active latent dimensions (Burda et al.)", "{:.0%}"),
    ("probe_accuracy_mean", "attribute probe accuracy (higher is better)", "{:.3f}"),
    ("probe_baseline_mean", "majority-class baseline", "{:.3f}"),
    ("fid_sum", "FID sum (the objective's default)", "{:.1f}"),
)
SETTINGS = (  # the same in every run of a variant
    ("steps", "training steps", "{:d}"),
    ("kl_weight", "loss.kl_weight", "{:.3g}"),
    ("perceptual_weight", "loss.perceptual_weight", "{:.3g}"),
    ("pixel_weight", "loss.pixel_weight", "{:.3g}"),
    ("feature_norm", "loss.feature_norm", "{}"),
    ("feature_shift", "loss.feature_shift", "{:d}"),
    ("upsample", "model.upsample", "{}"),
    ("full_res_convs", "model.full_res_convs", "{:d}"),
    ("ema_decay", "train.ema_decay", "{:g}"),
)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Variant:
    name: str
    cfg: Config
    tuned: dict[str, Any] | None  # the tune stage's overrides applied, if any
    seed: int


def plain_kl_weight(cfg: Config) -> float:
    """1/D, D = 3 H W: sum-of-squares -ELBO (Gaussian decoder, variance 1/2) in mean-pixel units."""
    return 1.0 / (3 * cfg.data.image_size**2)


def variants(cfg: Config, out_dir: Path, plain_kl: float | None = None, seeds: int = 1) -> list[Variant]:
    """Every run, seed by seed and both variants per seed, each with its own train, Ray and eval
    folders under out_dir/<variant>/seed<s>."""
    if seeds < 1:
        raise ConfigError(f"--seeds is {seeds}: train at least one seed per variant.")
    tuned = best_overrides(cfg)
    dfc = cfg.with_overrides(tuned) if tuned else cfg
    plain = dfc.with_overrides(
        {
            "loss.perceptual_weight": 0.0,
            "loss.pixel_weight": 1.0,
            "loss.kl_weight": plain_kl_weight(cfg) if plain_kl is None else plain_kl,
        }
    )
    out = []
    for seed in range(cfg.train.seed, cfg.train.seed + seeds):
        for name, variant_cfg, applied in (("plain_vae", plain, None), ("dfc_vae", dfc, tuned)):
            where = out_dir / name / f"seed{seed}"
            placed = {
                "train.seed": seed,
                "train.out_dir": str(where / "train"),
                "scaling.storage_dir": str(where / "ray"),
                "eval.out_dir": str(where / "eval"),
            }
            out.append(Variant(name, variant_cfg.with_overrides(placed), applied, seed))
    return out


def check_inputs(cfg: Config) -> None:
    """The shards must exist before any Ray or MLflow work starts."""
    if "://" not in cfg.data.shards_dir and not cfg.data.manifest_path.is_file():
        raise FileNotFoundError(
            f"{cfg.data.manifest_path} not found: make the shards first (`python -m pipeline.demo` for the "
            "demo data, or `dvc repro shard`), then run the comparison."
        )
    evaluate.check_settings(cfg)


# ---------------------------------------------------------------- one variant


def train_and_evaluate(variant: Variant, index: int, total: int) -> dict[str, Any]:
    """Train and evaluate as the train and evaluate stages do; -> the variant's comparison row."""

    cfg, loss = variant.cfg, variant.cfg.loss
    which = f"run {index}/{total} {variant.name} seed {variant.seed}"
    status(
        f"{which}: training {cfg.train.steps} steps "
        f"(kl_weight {loss.kl_weight:.3g}, perceptual_weight {loss.perceptual_weight:.3g}, "
        f"pixel_weight {loss.pixel_weight:.3g})"
    )
    start = time.perf_counter()
    trained = train(cfg)
    train_seconds = time.perf_counter() - start
    uri, run_id = tracking.training_run(cfg)
    logger = tracking.RunLogger(uri, run_id)
    logger.tag("compare.variant", variant.name)
    logger.tag("compare.seed", str(variant.seed))
    status(f"{which}: trained in {train_seconds / 60:.1f} min; evaluating")
    start = time.perf_counter()
    numbers = evaluate_trained(cfg)
    eval_seconds = time.perf_counter() - start
    run = logger.run()
    row: dict[str, Any] = {"seed": variant.seed}
    row |= {key: _maybe(numbers, f"test/{key}") for key, _, _ in MEASURED}
    row |= {
        "fid_inception": numbers["test/fid_inception"],
        "fid_images": int(numbers["test/fid_images"]),
        "steps": int(trained["step"]),
        "kl_weight": loss.kl_weight,
        "perceptual_weight": loss.perceptual_weight,
        "pixel_weight": loss.pixel_weight,
        "feature_norm": loss.feature_norm,
        "feature_shift": loss.feature_shift,
        "upsample": cfg.model.upsample,
        "full_res_convs": cfg.model.full_res_convs,
        "ema_decay": cfg.train.ema_decay,
        "perceptual": {"backbone": cfg.perceptual.backbone, "layers": list(cfg.perceptual.layers)},
        "tuned_overrides": variant.tuned,
        "mlflow_run_id": run_id,
        "manifest_hash": run.data.tags.get("data.manifest_hash"),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "eval_dir": cfg.eval.out_dir,
    }
    status(
        f"{which}: FID samples {row['fid_samples']:.1f}, recon {row['fid_recon']:.1f}, "
        f"PSNR {row['psnr']:.2f} dB ({eval_seconds / 60:.1f} min)"
    )
    return row


def _maybe(numbers: dict[str, Any], key: str) -> float | None:
    return float(numbers[key]) if key in numbers else None


def status(message: str) -> None:
    print(f"[compare] {time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------- the comparison files


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, list[float] | None]:
    """(mean, its two-sided t interval) over seeds; no interval from one value."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
    return mean, [mean - half, mean + half]


def verdict(interval: list[float] | None, confidence: float = CONFIDENCE) -> str:
    """The words for a DFC-VAE minus plain VAE interval."""
    if interval is not None and interval[1] < 0:
        return f"DFC-VAE lower with {confidence:.0%} confidence"
    if interval is not None and interval[0] > 0:
        return f"DFC-VAE higher with {confidence:.0%} confidence"
    return "no difference shown"


def comparison(cfg: Config, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The shared settings once; per variant its runs and the mean of each metric over seeds with
    its interval; per metric the paired difference over seeds and its verdict."""
    first = runs[VARIANTS[0]][0]
    summary: dict[str, dict[str, Any]] = {}
    for name, rows in runs.items():
        summary[name] = {key: rows[0][key] for key, _, _ in SETTINGS}
        summary[name]["seeds"] = [row["seed"] for row in rows]
        for key, _, _ in MEASURED:
            values = [row[key] for row in rows if row[key] is not None]
            mean, interval = mean_interval(values) if values else (None, None)
            summary[name][key], summary[name][f"{key}_interval"] = mean, interval
    verdicts = {}
    for key, _, _ in MEASURED:
        pairs = [(p[key], d[key]) for p, d in zip(runs["plain_vae"], runs["dfc_vae"], strict=True)]
        if any(v is None for pair in pairs for v in pair):
            continue
        difference, interval = mean_interval([d - p for p, d in pairs])
        verdicts[key] = {"difference": difference, "interval": interval, "verdict": verdict(interval)}
    return {
        "steps": first["steps"],
        "seeds": summary[VARIANTS[0]]["seeds"],
        "confidence": CONFIDENCE,
        "shards_dir": cfg.data.shards_dir,
        "manifest_hash": manifest_hash(cfg),
        "image_size": cfg.data.image_size,
        "model": cfg.to_dict()["model"],
        "batch_size": cfg.global_batch_size,
        "fid_inception": first["fid_inception"],
        "fid_images": first["fid_images"],
        "plain_vae_loss": "sum over pixels (x - x_hat)^2 + KL, i.e. pixel_weight 1, kl_weight 1/(3 H W)",
        "variants": summary,
        "verdicts": verdicts,
        "runs": runs,
    }


def _cell(fmt: str, mean: Any, interval: list[float] | None) -> str:
    if mean is None:
        return "-"
    if interval is None:
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def markdown_table(result: dict[str, Any]) -> str:
    """Measured rows: mean over seeds [interval] per variant and the verdict; then the settings."""
    rows, verdicts = result["variants"], result["verdicts"]
    lines = [
        f"| | {' | '.join(LABELS[v] for v in VARIANTS)} | verdict |",
        f"|---|{'---:|' * len(VARIANTS)}---|",
    ]
    for key, label, fmt in MEASURED:
        cells = [_cell(fmt, rows[v][key], rows[v][f"{key}_interval"]) for v in VARIANTS]
        lines.append(f"| {label} | {' | '.join(cells)} | {verdicts.get(key, {}).get('verdict', '-')} |")
    for key, label, fmt in SETTINGS:
        lines.append(f"| {label} | {' | '.join(fmt.format(rows[v][key]) for v in VARIANTS)} | |")
    return "\n".join(lines) + "\n"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    seeds = result["seeds"]
    text = (
        f"FID and KID with `{result['fid_inception']}` on {result['fid_images']} test images "
        f"(prior samples and reconstructions against the same real images); both variants: "
        f"{result['steps']} steps, batch {result['batch_size']}, seeds {', '.join(map(str, seeds))}, "
        f"{result['image_size']} px, shards {result['manifest_hash'][:12]}. Each cell: the mean over "
        f"{len(seeds)} seed(s) [{result['confidence']:.0%} t interval]; the verdict is on the paired "
        f"differences (DFC-VAE minus plain VAE, same seed).\n\n" + markdown_table(result)
    )
    path.write_text(text)


# ---------------------------------------------------------------- pictures


def figure_sizes(image_size: int) -> dict[str, tuple[int, int]]:
    """(width, height) in px of reconstructions.png and samples.png (module docstring)."""
    recon_w, recon_h = pictures.grid_size(1 + len(VARIANTS), RECON_COLS, image_size)
    panel_w, panel_h = pictures.grid_size(SAMPLE_ROWS, SAMPLE_COLS, image_size)
    return {
        "reconstructions.png": (LABEL_WIDTH + recon_w, recon_h),
        "samples.png": (len(VARIANTS) * panel_w + (len(VARIANTS) - 1) * PANEL_GAP, LABEL_HEIGHT + panel_h),
    }


def label_font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def reconstructions_figure(models: dict, images: Tensor) -> Image.Image:
    """Test images, then each variant's decode(mu), one labelled row each."""
    rows = [images]
    with torch.no_grad():
        for name in VARIANTS:
            model = models[name]
            rows.append(model.decode(model.encode(images.to(_device(model)))[0]).float().cpu())
    grid = pictures.grid_image(torch.cat(rows), nrow=len(images))
    figure = Image.new("RGB", (LABEL_WIDTH + grid.width, grid.height), "white")
    figure.paste(grid, (LABEL_WIDTH, 0))
    draw, font = ImageDraw.Draw(figure), label_font()
    step = images.shape[-1] + pictures.GRID_PADDING
    for i, text in enumerate(("test images", *(LABELS[v] for v in VARIANTS))):
        draw.text((6, pictures.GRID_PADDING + i * step + step // 2), text, fill="black", font=font, anchor="lm")
    return figure


def samples_figure(models: dict, seed: int) -> Image.Image:
    """The same prior draws z through each variant's decoder, panels side by side under their labels."""
    latent_dim = models[VARIANTS[0]].latent_dim
    z = torch.randn(SAMPLE_ROWS * SAMPLE_COLS, latent_dim, generator=torch.Generator().manual_seed(seed))
    panels = []
    with torch.no_grad():
        for name in VARIANTS:
            model = models[name]
            panels.append(pictures.grid_image(model.decode(z.to(_device(model))), nrow=SAMPLE_COLS))
    width = sum(p.width for p in panels) + PANEL_GAP * (len(panels) - 1)
    figure = Image.new("RGB", (width, LABEL_HEIGHT + panels[0].height), "white")
    draw, font = ImageDraw.Draw(figure), label_font()
    x = 0
    for name, panel in zip(VARIANTS, panels):
        figure.paste(panel, (x, LABEL_HEIGHT))
        draw.text(
            (x + panel.width // 2, LABEL_HEIGHT // 2),
            f"{LABELS[name]}: prior samples",
            fill="black",
            font=font,
            anchor="mm",
        )
        x += panel.width + PANEL_GAP
    return figure


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def write_pictures(cfg: Config, model_dirs: dict[str, Path], out_dir: Path) -> dict[str, list[int]]:
    """reconstructions.png and samples.png from each variant's model.pt; -> {file: [width, height]}."""
    models = {name: model_from_state(load_checkpoint(path / "model.pt"), "cpu")[0] for name, path in model_dirs.items()}
    images, _ = evaluate.read_split(cfg, "test", RECON_COLS)
    x = prepare_batch(images, "cpu", train=False).contiguous()  # (C, 3, S, S) in [-1, 1]
    figures = {
        "reconstructions.png": reconstructions_figure(models, x),
        "samples.png": samples_figure(models, cfg.eval.seed),
    }
    for name, figure in figures.items():
        figure.save(out_dir / name)
    return {name: list(figure.size) for name, figure in figures.items()}


# ---------------------------------------------------------------- the command


def compare(cfg: Config, out_dir: Path, plain_kl: float | None = None, seeds: int = 1) -> dict[str, Any]:
    """Train and evaluate both variants at each seed; write comparison.json, comparison.md and the
    pictures into out_dir."""
    check_inputs(cfg)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = variants(cfg, out_dir, plain_kl, seeds)
    if chosen[1].tuned is None:
        status("no tune results (tune.enabled false or no best_overrides.json): DFC-VAE uses the loss in params")
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for i, variant in enumerate(chosen, 1):
        runs[variant.name].append(train_and_evaluate(variant, i, len(chosen)))
    identities = {(row["fid_inception"], row["fid_images"]) for rows in runs.values() for row in rows}
    if len(identities) != 1:
        raise RuntimeError(f"the runs' FIDs used different networks or counts {sorted(identities)}; not comparable.")
    result = comparison(cfg, runs)
    first = {v.name: Path(v.cfg.train.out_dir) for v in chosen if v.seed == cfg.train.seed}
    result["pictures"] = write_pictures(cfg, first, out_dir)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_json(result, out_dir / "comparison.json")
    write_markdown(result, out_dir / "comparison.md")
    status(f"done in {result['wall_seconds'] / 60:.1f} min: {out_dir}/comparison.md, reconstructions.png, samples.png")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default: train.steps)")
    parser.add_argument(
        "--plain-kl-weight",
        type=float,
        default=None,
        help="the plain VAE's loss.kl_weight (default: 1/(3 H W), the sum-of-squares ELBO)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant, run one after another (default: 1)")
    parser.add_argument("--out-dir", default="outputs/compare", help="default: outputs/compare")


@command("compare")
def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(__doc__.splitlines()[0], argv, add_arguments)
    if args.steps is not None:
        cfg = cfg.with_overrides({"train.steps": args.steps})
    compare(cfg, Path(args.out_dir), args.plain_kl_weight, args.seeds)
    print(Path(args.out_dir, "comparison.md").read_text(), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
