"""Stage `evaluate`: the trained model on the test split, metrics and pictures.

Inputs: train.out_dir/model.pt (the architecture comes from the config stored in it, what
was trained; every eval setting and the data paths from params.yaml), the shards, and
train.out_dir/run.json when present (metrics and files are then logged to that MLflow run).
Outputs (eval.out_dir), rewritten on every run; dfcvae/evaluate.py documents each:
    metrics.json (DVC metrics), probe.json and probe.csv (DVC plots), evaluation.json,
    scores.npz, samples.png, reconstructions.png, interpolations.png, attribute_arithmetic.png.
Prints the main numbers, each with its bootstrap interval where it has one.
"""

from __future__ import annotations

import json
import sys

from dfcvae.evaluate import evaluate_trained
from pipeline.common import command, parse_config

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
