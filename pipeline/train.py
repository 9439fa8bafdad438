"""Stage `train`: DFC-VAE on Ray Train (DDP), tracked in MLflow.

Runs the same way as a DVC stage, from a shell, and under
`ray job submit --working-dir . -- python -m pipeline.train` (RAY_ADDRESS set).
Outputs (train.out_dir): model.pt (VAE weights + config), metrics.json,
log.csv (per-step curves for `dvc plots`), run.json (the MLflow run id).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from dfcvae import data, tracking
from dfcvae.config import Config
from dfcvae.train import absolute_paths, check_config, export_outputs, fit
from pipeline.common import command, init_ray, parse_config, with_best_overrides, write_json


def run_name(cfg: Config, manifest_hash: str, code: str) -> str:
    """The run's identity: its config, its data (the shards' manifest hash) and its code (the
    dfcvae package's digest). A rerun after an interruption has the same name and resumes from
    Ray's checkpoints under scaling.storage_dir; new data or new code is a new run from step 0."""
    identity = {"config": cfg.to_dict(), "manifest_hash": manifest_hash, "code": code}
    return f"train-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]}"


def train(cfg: Config) -> dict[str, float]:
    check_config(cfg)
    cfg = absolute_paths(cfg)
    uri = tracking.setup(cfg.mlflow)
    manifest, manifest_hash = data.read_manifest(cfg), data.manifest_hash(cfg)
    tags = tracking.run_tags(cfg, manifest, manifest_hash)
    run_id = tracking.start_run(cfg, "train", tags)
    logger = tracking.RunLogger(uri, run_id)
    out_dir = Path(cfg.train.out_dir)
    (out_dir / "reports.jsonl").unlink(missing_ok=True)  # this run's audit log only
    try:
        init_ray(cfg)
        loop_config = {"config": cfg.to_dict(), "mlflow_uri": uri, "mlflow_run_id": run_id}
        name = run_name(cfg, manifest_hash, tracking.code_digest())
        result = fit(cfg, loop_config, name)
        with result.checkpoint.as_directory() as checkpoint_dir:
            metrics = export_outputs(Path(checkpoint_dir), out_dir)
        write_json(metrics, out_dir / "metrics.json")
        write_json({"run_id": run_id, "tracking_uri": uri}, out_dir / "run.json")
        for name in ("metrics.json", "log.csv"):
            logger.artifact(out_dir / name)
        logger.finish()
        return metrics
    except BaseException:
        logger.finish("FAILED")
        raise


@command("train")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    metrics = train(with_best_overrides(cfg))
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("val/")}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
