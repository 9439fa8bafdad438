"""Plain VAE vs DFC-VAE on the same shards: the same model, seed, data order and steps, two losses.

    python -m pipeline.compare [--params params.yaml] [--set key=value ...] [--steps N]
                               [--plain-kl-weight W] [--out-dir outputs/compare]

Trains both variants with the train stage (Ray Train, tracked in MLflow, run tag
`compare.variant`) and evaluates both with the evaluate stage's evaluation (the same
Inception network and test images), one after the other:

    dfc_vae    the workspace config, with the tune stage's best overrides when they exist
    plain_vae  the same with loss.perceptual_weight 0 and loss.pixel_weight 1: the usual
               Gaussian-decoder VAE, -ELBO = sum over pixels (x - x_hat)^2 + KL (a fixed
               decoder variance of 1/2 on the [-1, 1] scale). The project's pixel term is a
               mean over D = 3 H W values, so that loss is kl_weight = 1/D with pixel_weight 1
               (`plain_kl_weight`; --plain-kl-weight sets another). The DFC-VAE's kl_weight is
               relative to a mean over feature elements and is not carried over: with it, the
               pixel VAE would be a strongly weighted beta-VAE, a different model.

Outputs (--out-dir):
    <variant>/train, <variant>/ray, <variant>/eval   each variant's train and evaluate outputs
    comparison.json    per variant: FIDs (samples, recon), PSNR, SSIM, MSE, probe accuracy and
                       baseline, reference distance, steps, loss settings, the MLflow run, the
                       shards' manifest hash, Inception identity and image count, wall times
    comparison.md      the numbers as a markdown table
    reconstructions.png  RECON_COLS test images (top row), then each variant's decode(mu),
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

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from dfcvae import data, evaluate, tracking
from dfcvae.checkpoint import load_checkpoint, model_from_state
from dfcvae.config import Config
from dfcvae.files import write_json
from dfcvae.train import train
from pipeline.common import best_overrides, command, parse_config

VARIANTS = ("plain_vae", "dfc_vae")  # row order of the pictures and the table
LABELS = {"plain_vae": "plain VAE", "dfc_vae": "DFC-VAE"}
RECON_COLS = 8
SAMPLE_ROWS, SAMPLE_COLS = 4, 4
LABEL_WIDTH = 96  # px, the label column of reconstructions.png
LABEL_HEIGHT = 22  # px, the label strip above each panel of samples.png
PANEL_GAP = 12  # px between the two sample panels
PAD = evaluate.GRID_PADDING
TABLE = (  # comparison.json key, table label, format
    ("fid_samples", "FID prior samples (lower is better)", "{:.1f}"),
    ("fid_recon", "FID reconstructions (lower is better)", "{:.1f}"),
    ("psnr", "PSNR dB (higher is better)", "{:.2f}"),
    ("ssim", "SSIM (higher is better)", "{:.3f}"),
    ("mse", "MSE, [0, 1] scale (lower is better)", "{:.4f}"),
    ("reference_distance", "reference feature distance (lower is better)", "{:.3f}"),
    ("nyquist_ratio", "Nyquist power, reconstructions / real (over 1: a checkerboard)", "{:.2f}"),
    ("active_fraction", "active latent dimensions (Burda et al.)", "{:.0%}"),
    ("probe_accuracy_mean", "attribute probe accuracy (higher is better)", "{:.3f}"),
    ("probe_baseline_mean", "majority-class baseline", "{:.3f}"),
    ("steps", "training steps", "{:d}"),
    ("kl_weight", "loss.kl_weight", "{:.3g}"),
    ("perceptual_weight", "loss.perceptual_weight", "{:.3g}"),
    ("pixel_weight", "loss.pixel_weight", "{:.3g}"),
    ("feature_norm", "loss.feature_norm", "{}"),
    ("train_seconds", "training wall time, s", "{:.0f}"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    cfg: Config
    tuned: dict[str, Any] | None  # the tune stage's overrides applied, if any


def plain_kl_weight(cfg: Config) -> float:
    """1/D, D = 3 H W: sum-of-squares -ELBO (Gaussian decoder, variance 1/2) in mean-pixel units."""
    return 1.0 / (3 * cfg.data.image_size**2)


def variants(cfg: Config, out_dir: Path, plain_kl: float | None = None) -> list[Variant]:
    """Both variants, each with its own train, Ray and eval folders under out_dir."""
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
    for name, variant_cfg, applied in (("plain_vae", plain, None), ("dfc_vae", dfc, tuned)):
        where = out_dir / name
        out.append(
            Variant(
                name,
                variant_cfg.with_overrides(
                    {
                        "train.out_dir": str(where / "train"),
                        "scaling.storage_dir": str(where / "ray"),
                        "eval.out_dir": str(where / "eval"),
                    }
                ),
                applied,
            )
        )
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
    status(
        f"{index}/{total} {variant.name}: training {cfg.train.steps} steps (kl_weight {loss.kl_weight:.3g}, "
        f"perceptual_weight {loss.perceptual_weight:.3g}, pixel_weight {loss.pixel_weight:.3g})"
    )
    start = time.perf_counter()
    trained = train(cfg)
    train_seconds = time.perf_counter() - start
    uri, run_id = tracking.training_run(cfg)
    tracking.RunLogger(uri, run_id).client.set_tag(run_id, "compare.variant", variant.name)
    status(f"{index}/{total} {variant.name}: trained in {train_seconds / 60:.1f} min; evaluating")
    start = time.perf_counter()
    numbers = evaluate.evaluate_trained(cfg)
    eval_seconds = time.perf_counter() - start
    run = tracking.RunLogger(uri, run_id).client.get_run(run_id)
    row = {
        key: float(numbers[f"test/{key}"])
        for key in ("fid_samples", "fid_recon", "fid_sum", "psnr", "ssim", "mse", "reference_distance")
    }
    row |= {
        key: _maybe(numbers, f"test/{key}")
        for key in ("probe_accuracy_mean", "probe_baseline_mean", "active_fraction", "nyquist_ratio")
    }
    row |= {
        "fid_inception": numbers["test/fid_inception"],
        "fid_images": int(numbers["test/fid_images"]),
        "steps": int(trained["step"]),
        "kl_weight": loss.kl_weight,
        "perceptual_weight": loss.perceptual_weight,
        "pixel_weight": loss.pixel_weight,
        "feature_norm": loss.feature_norm,
        "perceptual": {"backbone": cfg.perceptual.backbone, "layers": list(cfg.perceptual.layers)},
        "tuned_overrides": variant.tuned,
        "mlflow_run_id": run_id,
        "manifest_hash": run.data.tags.get("data.manifest_hash"),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "eval_dir": cfg.eval.out_dir,
    }
    status(
        f"{index}/{total} {variant.name}: FID samples {row['fid_samples']:.1f}, recon {row['fid_recon']:.1f}, "
        f"PSNR {row['psnr']:.2f} dB ({eval_seconds / 60:.1f} min)"
    )
    return row


def _maybe(numbers: dict[str, Any], key: str) -> float | None:
    return float(numbers[key]) if key in numbers else None


def status(message: str) -> None:
    print(f"[compare] {time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------- the comparison files


def comparison(cfg: Config, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The shared settings once, then one entry per variant."""
    first = rows[VARIANTS[0]]
    return {
        "steps": first["steps"],
        "seed": cfg.train.seed,
        "shards_dir": cfg.data.shards_dir,
        "manifest_hash": data.manifest_hash(cfg),
        "image_size": cfg.data.image_size,
        "model": cfg.to_dict()["model"],
        "batch_size": cfg.global_batch_size,
        "fid_inception": first["fid_inception"],
        "fid_images": first["fid_images"],
        "plain_vae_loss": "sum over pixels (x - x_hat)^2 + KL, i.e. pixel_weight 1, kl_weight 1/(3 H W)",
        "variants": rows,
    }


def markdown_table(result: dict[str, Any]) -> str:
    rows = result["variants"]
    lines = [
        f"| | {' | '.join(LABELS[v] for v in VARIANTS)} |",
        f"|---|{'---:|' * len(VARIANTS)}",
    ]
    for key, label, fmt in TABLE:
        cells = ["-" if rows[v][key] is None else fmt.format(rows[v][key]) for v in VARIANTS]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    text = (
        f"FID with `{result['fid_inception']}` on {result['fid_images']} test images "
        f"(prior samples and reconstructions against the same real images); both variants: "
        f"{result['steps']} steps, batch {result['batch_size']}, seed {result['seed']}, "
        f"{result['image_size']} px, shards {result['manifest_hash'][:12]}.\n\n" + markdown_table(result)
    )
    path.write_text(text)


# ---------------------------------------------------------------- pictures


def figure_sizes(image_size: int) -> dict[str, tuple[int, int]]:
    """(width, height) in px of reconstructions.png and samples.png (module docstring)."""
    recon_w, recon_h = evaluate.grid_size(1 + len(VARIANTS), RECON_COLS, image_size)
    panel_w, panel_h = evaluate.grid_size(SAMPLE_ROWS, SAMPLE_COLS, image_size)
    return {
        "reconstructions.png": (LABEL_WIDTH + recon_w, recon_h),
        "samples.png": (len(VARIANTS) * panel_w + (len(VARIANTS) - 1) * PANEL_GAP, LABEL_HEIGHT + panel_h),
    }


def grid_image(images: Tensor, nrow: int) -> Image.Image:
    """[-1, 1] images (N, 3, S, S) -> one PIL grid, as metrics.save_grid lays it out."""
    grid = make_grid(((images.float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=PAD)
    return Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy())


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
    grid = grid_image(torch.cat(rows), nrow=len(images))
    figure = Image.new("RGB", (LABEL_WIDTH + grid.width, grid.height), "white")
    figure.paste(grid, (LABEL_WIDTH, 0))
    draw, font = ImageDraw.Draw(figure), label_font()
    step = images.shape[-1] + PAD
    for i, text in enumerate(("test images", *(LABELS[v] for v in VARIANTS))):
        draw.text((6, PAD + i * step + step // 2), text, fill="black", font=font, anchor="lm")
    return figure


def samples_figure(models: dict, seed: int) -> Image.Image:
    """The same prior draws z through each variant's decoder, panels side by side under their labels."""
    latent_dim = models[VARIANTS[0]].latent_dim
    z = torch.randn(SAMPLE_ROWS * SAMPLE_COLS, latent_dim, generator=torch.Generator().manual_seed(seed))
    panels = []
    with torch.no_grad():
        for name in VARIANTS:
            model = models[name]
            panels.append(grid_image(model.decode(z.to(_device(model))), nrow=SAMPLE_COLS))
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
    x = data.prepare_batch(images, "cpu", train=False).contiguous()  # (C, 3, S, S) in [-1, 1]
    figures = {
        "reconstructions.png": reconstructions_figure(models, x),
        "samples.png": samples_figure(models, cfg.eval.seed),
    }
    for name, figure in figures.items():
        figure.save(out_dir / name)
    return {name: list(figure.size) for name, figure in figures.items()}


# ---------------------------------------------------------------- the command


def compare(cfg: Config, out_dir: Path, plain_kl: float | None = None) -> dict[str, Any]:
    """Train and evaluate both variants; write comparison.json, comparison.md and the pictures into out_dir."""
    check_inputs(cfg)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = variants(cfg, out_dir, plain_kl)
    if chosen[1].tuned is None:
        status("no tune results (tune.enabled false or no best_overrides.json): DFC-VAE uses the loss in params")
    start = time.perf_counter()
    rows = {v.name: train_and_evaluate(v, i, len(chosen)) for i, v in enumerate(chosen, 1)}
    identities = {(row["fid_inception"], row["fid_images"]) for row in rows.values()}
    if len(identities) != 1:
        raise RuntimeError(
            f"the variants' FIDs used different networks or counts {sorted(identities)}; not comparable."
        )
    result = comparison(cfg, rows)
    result["pictures"] = write_pictures(cfg, {v.name: Path(v.cfg.train.out_dir) for v in chosen}, out_dir)
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
    parser.add_argument("--out-dir", default="outputs/compare", help="default: outputs/compare")


@command("compare")
def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(__doc__.splitlines()[0], argv, add_arguments)
    if args.steps is not None:
        cfg = cfg.with_overrides({"train.steps": args.steps})
    compare(cfg, Path(args.out_dir), args.plain_kl_weight)
    print(Path(args.out_dir, "comparison.md").read_text(), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
