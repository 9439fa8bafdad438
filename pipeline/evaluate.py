"""Stage `evaluate`: the trained model on the test split, metrics and pictures.

Inputs: train.out_dir/model.pt (the architecture comes from the config stored in it, what
was trained; every eval setting and the data paths from params.yaml), the shards, and
train.out_dir/run.json when present (metrics and files are then logged to that MLflow run).
dfcvae/evaluate.py measures; this stage writes what it returns into eval.out_dir, swapped in whole
(no file of an earlier evaluation stays):
    metrics.json         the numbers, the objective under its own name (eval.objective), each
                         bootstrap interval as test/<metric>_ci: [low, high]; DVC metrics
    probe.json, .csv     one row per probed attribute: attribute, accuracy, baseline (DVC draws the
                         bars from probe.csv: `dvc plots show`)
    evaluation.json      how the numbers were made: Inception identity, image counts, seed, sampler,
                         FID protocol, skipped attributes, picture layout, wall time
    sampler.safetensors  eval.sampler as fitted (the registered model samples with it)
    scores.npz           what the numbers are made of (uncertainty.Scores), for the champion gate
    samples.png, reconstructions.png, interpolations.png, attribute_arithmetic.png
                         the grids (dfcvae/pictures.py), 2 px between images
Prints the main numbers, each with its bootstrap interval where it has one.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from dfcvae import tracking
from dfcvae.checkpoint import MODEL_FILE, load_checkpoint, model_from_state
from dfcvae.config import Config
from dfcvae.device import default_device
from dfcvae.evaluate import PICTURES, Evaluation, evaluate, evaluation_config
from dfcvae.files import staging_dir, swap_in, write_json
from dfcvae.model import DFCVAE
from dfcvae.pictures import save_grid
from dfcvae.sampler import SAMPLER_FILE, save_sampler
from dfcvae.uncertainty import SCORES_FILE
from pipeline.common import command, parse_config

FILES = ("metrics.json", "probe.json", "probe.csv", "evaluation.json", SAMPLER_FILE, SCORES_FILE, *PICTURES)

SUMMARY = (
    "test/fid_recon",
    "test/fid_samples",
    "test/fid_sum",
    "test/kid_recon",
    "test/kid_samples",
    "test/fid_images",
    "test/fid_inception",
    "test/psnr",
    "test/ssim",
    "test/active_fraction",
    "test/nyquist_ratio",
    "test/lattice_ratio",
    "test/probe_accuracy_mean",
    "test/probe_baseline_mean",
)


def write_evaluation(evaluation: Evaluation, target: Path) -> None:
    """Every file of the module docstring into `target`, written beside the previous evaluation
    and swapped in whole: none of its files stays, and a failure leaves it as it was."""
    out = staging_dir(target, ("evaluation.json", "metrics.json", "probe.json"))
    try:
        write_json(evaluation.metrics_record(), out / "metrics.json")
        rows = evaluation.probe_rows()
        write_json(rows, out / "probe.json")
        with (out / "probe.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["attribute", "accuracy", "baseline"])
            writer.writeheader()
            writer.writerows(rows)
        write_json(evaluation.details, out / "evaluation.json")
        save_sampler(evaluation.sampler, out / SAMPLER_FILE)
        evaluation.scores.save(out / SCORES_FILE)
        for name, (images, cols) in evaluation.grids.items():
            save_grid(images, out / name, nrow=cols)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    swap_in(out, target)


def evaluate_into(
    model: DFCVAE, cfg: Config, device: torch.device | str, logger: tracking.RunLogger | None = None, step: int = 0
) -> dict[str, Any]:
    """Evaluate `model` (dfcvae.evaluate), write the files into eval.out_dir and, with a `logger`,
    log the metrics at `step` and the files as artifacts under eval/.
    -> Evaluation.flat(): the metrics, numbers plus the string test/fid_inception."""
    evaluation = evaluate(model, cfg, device)
    target = Path(cfg.eval.out_dir)
    write_evaluation(evaluation, target)
    flat = evaluation.flat()
    if logger is not None:
        logger.metrics({k: v for k, v in flat.items() if k != "test/fid_inception"}, step)
        logger.tag("eval.fid_inception", evaluation.inception)
        for name in FILES:
            logger.artifact(target / name, "eval")
    return flat


def evaluate_trained(cfg: Config) -> dict[str, Any]:
    """The stage's work: train.out_dir/model.pt (its architecture from the config stored with it)
    on cfg's test split, logged to the training run named in train.out_dir/run.json when there is
    one. FileNotFoundError without model.pt."""
    model_path = Path(cfg.train.out_dir) / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found: run the train stage first.")
    device = default_device()
    state = load_checkpoint(model_path)
    model, trained = model_from_state(state, device)
    cfg = evaluation_config(cfg, trained)
    run = tracking.training_run(cfg)
    logger = tracking.RunLogger(*run) if run else None
    return evaluate_into(model, cfg, device, logger, int(state.get("step", 0)))


@command("evaluate")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    results = evaluate_trained(cfg)
    summary = {}
    for key in (k for k in SUMMARY if k in results):
        summary[key] = results[key]
        if f"{key}_ci_low" in results:
            summary[f"{key}_ci"] = [results[f"{key}_ci_low"], results[f"{key}_ci_high"]]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
