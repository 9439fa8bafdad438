"""Stage `tune`: Ray Tune search over `tune.space` (params.yaml), one Ray Train run per trial.

Runs the same way as a DVC stage, from a shell, and under
`ray job submit --working-dir . -- python -m pipeline.tune` (RAY_ADDRESS set).
Outputs (tune.out_dir):
- best_overrides.json: {"overrides": {dotted key: value}, "trial_id", "objective", "metric",
  "definition", "steps"}; the train stage applies the overrides over params.yaml;
- results.csv: one row per trial (trial_id, each searched key, objective, steps, status); DVC draws
  the objective against alpha and beta from it (`dvc plots show`, dvc.yaml's `plots:`).
With tune.enabled false it writes {"overrides": {}} and a header-only results.csv.
Tune's experiment folder and the trials' runs live in tune.out_dir/ray (not a DVC out): a
search whose driver was killed is restored from there on the next run, finished trials kept.
MLflow: one run for the search, with a nested run per trial.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dfcvae import tracking
from dfcvae import tune as search
from dfcvae.cluster import init_ray
from dfcvae.config import Config
from dfcvae.files import write_json
from dfcvae.shards.format import manifest_hash, read_manifest
from dfcvae.train import absolute_paths
from pipeline.common import command, parse_config


def tune(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the search; write and return the best-overrides record."""
    cfg = absolute_paths(cfg)
    if not cfg.tune.enabled:
        return write_outputs(cfg, [], {"overrides": {}})
    space = search.parse_space(cfg)  # a bad space fails before Ray or MLflow start
    cfg.tune.best_overrides_path.unlink(missing_ok=True)  # never leave a previous search's winner
    uri = tracking.setup(cfg.mlflow)
    path, restoring = search.prepare_experiment(cfg)
    if restoring:
        print(f"[tune] restoring the interrupted search in {path}", flush=True)
    run_id = search_run(cfg, path, uri)
    logger = tracking.RunLogger(uri, run_id)
    try:
        init_ray()
        rows = search.run_search(cfg, space, path, uri, run_id)
        search.close_trial_runs(rows, uri)
        best = write_outputs(cfg, rows, None)
        logger.tag("tune.best_trial_id", best["trial_id"])
        logger.metrics({"best/objective": best["objective"], "tune/trials": len(rows)}, 0)
        out = Path(cfg.tune.out_dir)
        for name in (search.RESULTS_FILE, cfg.tune.best_overrides_path.name):
            logger.artifact(out / name, "tune")
        logger.finish()
        return best
    except BaseException:
        try:
            search.kill_open_trial_runs(path, uri)
        except Exception as e:  # the search's own error is the one to raise
            print(f"[tune] could not close the trials' MLflow runs: {e}", flush=True)
        logger.finish("FAILED")
        raise


def write_outputs(cfg: Config, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any]:
    """results.csv first (it explains a failure), then the best trial's overrides."""
    search.write_results(cfg, rows, Path(cfg.tune.out_dir) / search.RESULTS_FILE)
    best = best if best is not None else search.best_overrides(cfg, rows)
    write_json(best, cfg.tune.best_overrides_path)
    return best


def search_run(cfg: Config, path: Path, uri: str) -> str:
    """The search's MLflow run: the interrupted search's own when it is being continued."""
    record = path / search.RUN_FILE
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous["tracking_uri"] == uri:
            tracking.RunLogger(uri, previous["run_id"]).status("RUNNING")
            return previous["run_id"]
    tags = tracking.run_tags(cfg, read_manifest(cfg), manifest_hash(cfg))
    tags["tune.experiment"] = path.name
    run_id = tracking.start_run(cfg, "tune", tags)
    write_json({"run_id": run_id, "tracking_uri": uri}, record)
    return run_id


@command("tune")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    print(json.dumps(tune(cfg), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
