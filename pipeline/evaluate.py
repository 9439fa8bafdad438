"""Stage `evaluate`: the trained model on the test split, metrics and pictures.

Inputs: train.out_dir/model.pt (the architecture comes from the config stored in it, what
was trained; every eval setting and the data paths from params.yaml), the shards, and
train.out_dir/run.json when present (metrics and files are then logged to that MLflow run).
Outputs (eval.out_dir), rewritten on every run; dfcvae/evaluate.py documents each:
    metrics.json (DVC metrics), probe.json and probe.csv (DVC plots), evaluation.json,
    samples.png, reconstructions.png, interpolations.png, attribute_arithmetic.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dfcvae import tracking
from dfcvae.checkpoint import MODEL_FILE, load_checkpoint, model_from_state
from dfcvae.config import Config, ConfigError
from dfcvae.evaluate import evaluate
from pipeline.common import command, parse_config

SUMMARY = (
    "test/fid_recon",
    "test/fid_samples",
    "test/fid_sum",
    "test/fid_images",
    "test/fid_inception",
    "test/psnr",
    "test/ssim",
    "test/active_fraction",
    "test/nyquist_ratio",
    "test/probe_accuracy_mean",
    "test/probe_baseline_mean",
)


def evaluation_config(params: Config, trained: Config) -> Config:
    """params.yaml with the model section it was trained with; the image sizes must agree."""
    if trained.data.image_size != params.data.image_size:
        raise ConfigError(
            f"the model was trained on {trained.data.image_size} px images but data.image_size is "
            f"{params.data.image_size}: evaluate with the params it was trained with, or retrain."
        )
    return params.with_overrides({f"model.{k}": v for k, v in trained.to_dict()["model"].items()})


def run_logger(cfg: Config) -> tracking.RunLogger | None:
    """A logger for the training run named in train.out_dir/run.json, or None without one."""
    run = tracking.training_run(cfg)
    return tracking.RunLogger(*run) if run else None


def run(cfg: Config) -> dict[str, Any]:
    model_path = Path(cfg.train.out_dir) / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found: run the train stage first.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = load_checkpoint(model_path)
    model, trained = model_from_state(state, device)
    cfg = evaluation_config(cfg, trained)
    return evaluate(model, cfg, device, logger=run_logger(cfg), step=int(state.get("step", 0)))


@command("evaluate")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    results = run(cfg)
    print(json.dumps({k: results[k] for k in SUMMARY if k in results}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
