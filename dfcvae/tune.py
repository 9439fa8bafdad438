"""Hyperparameter search: the params.yaml space, one Ray Train run per trial, ASHA.

The space is `tune.space` in params.yaml, by dotted key over the base config:
`loss.kl_weight: {loguniform: [0.1, 10.0]}`, `perceptual.layers: {choice: [vae123, vae345]}`;
the distributions are those in `DISTRIBUTIONS`. Every key and every value it can take
is checked through `Config.with_overrides` (and layer names against the backbone)
before any trial starts, so a misspelt key fails at once, naming the key.

The objective is `val/objective` from `dfcvae.evaluate.Evaluator.tuning_objective`, never a loss:
trials with different alpha, beta or feature layers optimise different losses, whose
values are not comparable. `tuning_objective` scores every model the same way, on a
fixed subset of `eval.val_subset` validation images, as `eval.objective`: by default
`fid_sum`, the FID of prior samples plus the FID of reconstructions (lower is better),
so a trial cannot win by buying sharp reconstructions with a prior it does not match,
or the reverse. The objective at a trial's last report is its score.

Each trial is a function trainable (Ray 2.60 Train V2 cannot be passed to the Tuner):
it builds a TorchTrainer with `TuneReportCallback`, which forwards each checkpoint
report (every `tune.report_every` steps) to Tune, where ASHA stops poor trials by
`step`. A trial keeps its Ray Train storage, step log and MLflow run id in its own
trial folder, so a trial restarted after an interruption resumes its own run and
no other. The experiment folder's name is a digest of the config, and a killed
search is continued with `Tuner.restore`, which does not rerun finished trials.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from dfcvae import tracking
from dfcvae.config import Config, ConfigError, UserError
from dfcvae.evaluate import Evaluator
from dfcvae.features import resolve_layers
from dfcvae.shards.format import manifest_hash, read_manifest
from dfcvae.train import fit, identity_digest

OBJECTIVE = "val/objective"  # dfcvae.evaluate.tuning_objective; lower is better
DONE_FILE = "search_done.json"  # in the experiment folder once the search has finished
RUN_FILE = "mlflow_run.json"  # in a trial folder: its MLflow run, reused if the trial restarts
RESULTS_FILE = "results.csv"  # in tune.out_dir, beside tune.best_overrides_path
LAYER_KEY = "perceptual.layers"


def _low_high(args: Any, positive: bool = False) -> tuple[float, float]:
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
        raise ValueError(f"expected [low, high], got {args!r}")
    low, high = args
    if not low < high or (positive and low <= 0):
        raise ValueError(f"expected {'0 < ' if positive else ''}low < high, got {args!r}")
    return low, high


def _non_empty(args: Any) -> list:
    if not (isinstance(args, list) and args):
        raise ValueError(f"expected a non-empty list of values, got {args!r}")
    return args


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


DISTRIBUTIONS: dict[str, Callable[[Any], Any]] = {  # params.yaml name -> Ray Tune domain
    "loguniform": lambda args: tune.loguniform(*_low_high(args, positive=True)),
    "uniform": lambda args: tune.uniform(*_low_high(args)),
    "choice": lambda args: tune.choice(_non_empty(args)),
    "grid": lambda args: tune.grid_search(_non_empty(args)),
}
# random: ranges and choices sampled num_samples times (grid keys crossed with them, as Tune does);
# grid: every key enumerated (choice lists too), num_samples repeats; a range is an error.
FIXED_KEYS = (
    "train.steps",
    "train.checkpoint_every",
    "train.val_every",
    "train.grid_every",
    "train.out_dir",
    "scaling.storage_dir",
)  # set per trial by trial_config


# ---------------------------------------------------------------- the space


def parse_space(cfg: Config) -> dict[str, Any]:
    """tune.space -> Tune's param_space {dotted key: distribution}, every key and value checked."""
    tune_cfg = cfg.tune
    if not tune_cfg.space:
        raise ConfigError("tune.space is empty: add at least one dotted key, or set tune.enabled: false.")
    if not 0 < tune_cfg.report_every <= tune_cfg.grace_period <= tune_cfg.steps:
        raise ConfigError(
            f"tune: need 0 < report_every <= grace_period <= steps, got {tune_cfg.report_every}, "
            f"{tune_cfg.grace_period}, {tune_cfg.steps}: ASHA can only compare trials at reported steps."
        )
    space = {}
    for key, spec in tune_cfg.space.items():
        where = f"tune.space '{key}'"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(f"{where}: expected one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}.")
        kind, args = next(iter(spec.items()))
        if tune_cfg.search_alg == "grid" and kind in ("loguniform", "uniform"):
            raise ConfigError(f"{where}: search_alg grid cannot enumerate a {kind} range; use {{grid: [...]}}.")
        if key.startswith("tune.") or key in FIXED_KEYS:
            raise ConfigError(f"{where}: not searchable; each trial sets it from tune.steps and tune.report_every.")
        try:
            space[key] = DISTRIBUTIONS[kind if tune_cfg.search_alg == "random" else "grid"](args)
        except ValueError as err:
            raise ConfigError(f"{where}: {kind} {err}.") from None
        # A range's two ends and a value between them that is not a whole number (a range samples
        # floats, which an integer field refuses), or every listed value.
        ranged = kind in ("loguniform", "uniform")
        for value in [float(args[0]), float(args[1]), float(args[0]) + 0.5] if ranged else args:
            check_override(cfg, key, value)
    return space


def check_override(cfg: Config, key: str, value: Any) -> Config:
    """The base config with one searched value, validated as params.yaml would be."""
    try:
        trial = cfg.with_overrides({key: value})
    except ConfigError as err:
        raise ConfigError(f"tune.space '{key}' = {value!r}: {err}") from None
    if key.startswith("perceptual."):
        try:
            resolve_layers(trial.perceptual.backbone, trial.perceptual.layers)
        except ValueError as err:
            raise ConfigError(f"tune.space '{key}' = {value!r}: {err}") from None
    return trial


def searched_keys(cfg: Config) -> list[str]:
    return list(cfg.tune.space)


def trial_config(base: Config, overrides: dict[str, Any], trial_dir: Path) -> Config:
    """The base config with a trial's values, its length and report interval, its own folders."""
    tune_cfg = base.tune
    return base.with_overrides(
        {
            **overrides,
            "train.steps": tune_cfg.steps,
            "train.checkpoint_every": tune_cfg.report_every,
            "train.val_every": tune_cfg.report_every,
            "train.grid_every": tune_cfg.report_every,
            "train.out_dir": str(trial_dir / "train"),
            "scaling.storage_dir": str(trial_dir / "ray"),
        }
    )


def experiment_name(cfg: Config) -> str:
    """Stable for one search, so a rerun after a kill restores it: the digest of its settings, its
    data and its code (identity_digest). A search over other shards (same path, new manifest) or
    other code is a new search, never a restored one whose trials were scored on other data."""
    return f"search-{identity_digest(cfg, manifest_hash(cfg), tracking.code_digest())}"


def experiment_path(cfg: Config) -> Path:
    return Path(cfg.tune.out_dir) / "ray" / experiment_name(cfg)


# ---------------------------------------------------------------- one trial


def run_trial(config: dict[str, Any], base: dict[str, Any], experiment: str, mlflow_uri: str, parent_run_id: str):
    """A Tune function trainable: one Ray Train run of the base config with the trial's values.

    It sets its MLflow run FINISHED when training returns, and nothing when it raises: the driver's
    close_trial_runs sets FAILED for an errored trial. A trial that ASHA stops is torn down without
    waiting for this thread (Ray's FunctionTrainable.cleanup finishes its session with timeout=0),
    so whatever that teardown raises here can come after the driver has closed the run, and a
    status written then would overwrite the driver's."""
    trial_id = tune.get_context().get_trial_id()
    # The trial's folder in the experiment (trial_dirname), not Tune's session-local trial dir,
    # which a restored search does not see again.
    trial_dir = Path(experiment) / trial_id
    cfg = trial_config(Config.from_dict(base), config, trial_dir)
    run_id = trial_run(cfg, trial_id, trial_dir, mlflow_uri, parent_run_id)
    loop_config = {"config": cfg.to_dict(), "mlflow_uri": mlflow_uri, "mlflow_run_id": run_id, "objective": Evaluator()}
    logger = tracking.RunLogger(mlflow_uri, run_id)
    fit(cfg, loop_config, "train", callbacks=(TuneReportCallback(),))
    logger.finish()


def trial_run(cfg: Config, trial_id: str, trial_dir: Path, mlflow_uri: str, parent_run_id: str) -> str:
    """The trial's MLflow run, nested under the search's: created once, reused if the trial restarts."""
    path = trial_dir / RUN_FILE
    trial_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        run_id = json.loads(path.read_text())["run_id"]
        MlflowClient(tracking_uri=mlflow_uri).update_run(run_id, status="RUNNING")
        return run_id
    mlflow.set_tracking_uri(mlflow_uri)  # start_run uses the global client
    tags = tracking.run_tags(cfg, read_manifest(cfg), manifest_hash(cfg))
    tags.update({"tune.trial_id": trial_id, "tune.experiment": trial_dir.parent.name})
    run_id = tracking.start_run(cfg, f"trial-{trial_id}", tags, parent_run_id=parent_run_id, data="training")
    path.write_text(json.dumps({"run_id": run_id}) + "\n")
    return run_id


# ---------------------------------------------------------------- the search


def trial_dirname(trial) -> str:
    return trial.trial_id


def make_tuner(cfg: Config, space: dict[str, Any], trainable, path: Path):
    """A Tuner for a new search, or the interrupted one at `path` restored (finished trials kept)."""
    if tune.Tuner.can_restore(str(path)):
        # Trials that were running, or had errored, run again from their last Ray Train checkpoint.
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, restart_errored=True)
    tune_cfg = cfg.tune
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=tune_cfg.steps,
        grace_period=tune_cfg.grace_period,
        reduction_factor=tune_cfg.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="min",
            scheduler=scheduler,
            num_samples=tune_cfg.num_samples,
            # The generator limits concurrency itself (Tune ignores max_concurrent_trials for it).
            search_alg=BasicVariantGenerator(max_concurrent=tune_cfg.max_concurrent, random_state=cfg.train.seed),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent)),
    )


def prepare_experiment(cfg: Config) -> tuple[Path, bool]:
    """The experiment folder and whether it holds an interrupted search to restore.

    A finished search is not restored: rerunning the stage starts it afresh.
    """
    path = experiment_path(cfg)
    if (path / DONE_FILE).is_file():
        shutil.rmtree(path)
    return path, tune.Tuner.can_restore(str(path))


class SearchInterrupted(UserError):
    """The search was stopped by Ctrl-C, not done; a rerun of the same command restores it."""


def run_search(
    cfg: Config, space: dict[str, Any], path: Path, mlflow_uri: str, parent_run_id: str
) -> list[dict[str, Any]]:
    """Run (or finish) the search at `path` over `parse_space(cfg)`; one row per trial, by trial id.
    SearchInterrupted, with the search left to restore, on Ctrl-C (SIGINT). Tune still ends the
    search as if done on SIGUSR1, which it always catches."""
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=cfg.to_dict(), experiment=str(path), mlflow_uri=mlflow_uri, parent_run_id=parent_run_id
        ),
        {"CPU": cfg.tune.driver_cpus},
    )
    # Tune's own Ctrl-C handler ends the search as if it were done: the running trials are marked
    # TERMINATED, and this function would declare a winner and mark the search finished.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        results = make_tuner(cfg, space, trainable, path).fit()
    except KeyboardInterrupt:
        raise SearchInterrupted(
            f"the search was interrupted (Ctrl-C); its state is kept in {path}: run the same command again "
            "to resume it."
        ) from None
    rows = sorted((trial_row(cfg, result) for result in results), key=lambda row: row["trial_id"])
    (path / DONE_FILE).write_text(json.dumps({"trials": len(rows)}) + "\n")
    return rows


def trial_row(cfg: Config, result) -> dict[str, Any]:
    """trial_id, the searched values, the objective at the last report, steps done, status."""
    metrics = result.metrics or {}
    steps = int(metrics.get("step", 0))
    objective = float(metrics.get(OBJECTIVE, math.nan))
    if result.error is not None:
        status = "error"
    else:
        status = "completed" if steps >= cfg.tune.steps else "stopped"  # stopped: by ASHA
    row: dict[str, Any] = {"trial_id": Path(result.path).name}
    row.update({key: result.config.get(key) for key in searched_keys(cfg)})
    row.update({"objective": objective, "steps": steps, "status": status})
    row["run_id"] = _trial_run_id(Path(result.path))
    return row


def _trial_run_id(trial_dir: Path) -> str:
    path = trial_dir / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else ""


def close_trial_runs(rows: list[dict[str, Any]], mlflow_uri: str) -> None:
    """Every trial's MLflow run gets its final status here, from Tune's outcome (run_trial says why
    the trial does not set it itself when it fails or is stopped)."""
    client = MlflowClient(tracking_uri=mlflow_uri)
    for row in rows:
        if row["run_id"]:
            client.set_tag(row["run_id"], "tune.status", row["status"])
            client.set_terminated(row["run_id"], "FAILED" if row["status"] == "error" else "FINISHED")


def kill_open_trial_runs(experiment: Path, mlflow_uri: str) -> list[str]:
    """When the search itself fails (close_trial_runs never ran): the MLflow runs of its trials
    still RUNNING are set KILLED, and their ids returned. A restored search sets each again
    RUNNING when its trial restarts (trial_run), and closes it with Tune's outcome."""
    client = MlflowClient(tracking_uri=mlflow_uri)
    killed = []
    for path in sorted(experiment.glob(f"*/{RUN_FILE}")):
        run_id = _trial_run_id(path.parent)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            killed.append(run_id)
    return killed


# ---------------------------------------------------------------- outputs


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Among the trials that completed the full budget (tune.steps) without error and with a
    finite objective, the lowest (ties: the smaller trial id). A trial that errored, or that
    ASHA stopped early, reported its objective after fewer steps: not comparable, never picked."""
    scored = [row for row in rows if row["status"] == "completed" and math.isfinite(row["objective"])]
    if not scored:
        counts = {status: sum(row["status"] == status for row in rows) for status in ("completed", "stopped", "error")}
        raise RuntimeError(
            f"no trial completed tune.steps with a finite {OBJECTIVE} ({counts['completed']} completed, "
            f"{counts['stopped']} stopped early, {counts['error']} errored of {len(rows)}); see the results table "
            "and the trial folders' error.txt, then narrow tune.space (a smaller optim.lr, say)."
        )
    return min(scored, key=lambda row: (row["objective"], row["trial_id"]))


def best_overrides(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best-overrides file's content: the best trial's searched values, and why it won."""
    best = best_trial(rows)
    return {
        "overrides": {key: best[key] for key in searched_keys(cfg)},
        "trial_id": best["trial_id"],
        "objective": best["objective"],
        "metric": OBJECTIVE,
        "definition": cfg.eval.objective,
        "steps": best["steps"],
    }


def result_columns(cfg: Config) -> list[str]:
    return ["trial_id", *searched_keys(cfg), "objective", "steps", "status"]


def write_results(cfg: Config, rows: list[dict[str, Any]], path: Path) -> None:
    """One row per trial; list values (layer lists) joined with ','. Header only when no rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = result_columns(cfg)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: as_text(row[k]) for k in columns})
    tmp.replace(path)


def read_results(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def as_text(value: Any) -> str:
    """A table cell: lists (custom layer sets) joined with ',', as Config.flat does."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
