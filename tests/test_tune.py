"""The hyperparameter search on a real local Ray cluster, MLflow on SQLite, synthetic shards."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dfcvae import tune as tuning
from dfcvae.config import Config, ConfigError
from pipeline.common import with_best_overrides
from pipeline.tune import tune
from tests.conftest import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]

SEARCH = {
    "tune.enabled": True,
    "tune.search_alg": "random",
    "tune.num_samples": 1,  # x 2 layer sets of the grid = 2 trials, one after the other: the first
    "tune.max_concurrent": 1,  # has finished while the second has not, whenever the driver is killed
    "tune.steps": 4,
    "tune.report_every": 2,
    "tune.grace_period": 2,
    "tune.reduction_factor": 2,
    "tune.driver_cpus": 0.25,
    "tune.space": {
        "loss.kl_weight": {"loguniform": [0.1, 10.0]},
        "loss.perceptual_weight": {"loguniform": [0.05, 5.0]},
        "perceptual.layers": {"grid": ["vae123", ["block1", "block6"]]},
    },
    "scaling.num_workers": 1,
    "scaling.cpus_per_worker": 0.5,
    "scaling.max_failures": 0,
    "eval.val_subset": 16,
    "train.val_batches": 1,
    "train.log_every": 2,
    "loader.num_workers": 0,
}


def search_config(base: Config, root: Path, **overrides) -> Config:
    return base.with_overrides(
        {
            **SEARCH,
            "tune.out_dir": str(root / "tune"),
            "mlflow.local_db": str(root / "mlflow.db"),
            "mlflow.local_artifacts": str(root / "artifacts"),
            **overrides,
        }
    )


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


@dataclass
class Interrupted:
    cfg: Config
    client: MlflowClient
    finished: str  # the trial that had finished when the driver was interrupted
    before: dict[str, bytes]  # its files at that moment
    restored: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def search(ray_cluster, synthetic_cfg, tmp_path_factory) -> Interrupted:
    """`python -m pipeline.tune`, interrupted with Ctrl-C (SIGINT) once a trial has finished, then
    run again to the end. The first run must end with status 1 and say how to resume, with no winner
    written and the search not marked done (Tune's own Ctrl-C handler would return as if it were).

    The drivers join the test's cluster, as `ray job submit` joins a long-lived one.
    """
    root = tmp_path_factory.mktemp("search")
    cfg = search_config(synthetic_cfg, root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    command = [sys.executable, "-m", "pipeline.tune", "--params", str(params)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "RAY_ADDRESS": ray_cluster}
    experiment = tuning.experiment_path(cfg)

    started = time.perf_counter()
    with (root / "first.log").open("w") as log:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            finished = _wait_for_a_finished_trial(experiment, first)
            first.send_signal(signal.SIGINT)
            first.wait(timeout=180)
        finally:
            if first.poll() is None:
                first.send_signal(signal.SIGKILL)
                first.wait()
    killed = time.perf_counter()
    said = (root / "first.log").read_text()
    assert first.returncode == 1 and "tune: the search was interrupted (Ctrl-C)" in said, said[-3000:]
    assert not cfg.tune.best_overrides_path.exists() and not (experiment / tuning.DONE_FILE).exists()
    trial_dir = experiment / finished
    before = {name: (trial_dir / name).read_bytes() for name in ("result.json", "train/reports.jsonl")}

    restored = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-3000:]
    print(f"search: {killed - started:.0f} s to the kill, {time.perf_counter() - killed:.0f} s restored")
    return Interrupted(cfg, MlflowClient(tracking_uri=tracking_uri(root)), finished, before, restored)


def _wait_for_a_finished_trial(experiment: Path, process: subprocess.Popen) -> str:
    """The id of a trial that Tune has saved as TERMINATED while another has not finished."""
    found: list[str] = []

    def one_finished() -> bool:
        for state in experiment.glob("experiment_state-*.json"):
            try:
                trials = [json.loads(entry[0]) for entry in json.loads(state.read_text())["trial_data"]]
            except (json.JSONDecodeError, KeyError, OSError):
                continue  # being rewritten
            done = [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]
            if done and len(done) < len(trials):
                found.append(done[0])
                return True
        return False

    wait_until(one_finished, "a finished trial while another runs", process=process)
    return found[0]


def _results(cfg: Config) -> list[dict[str, str]]:
    return tuning.read_results(Path(cfg.tune.out_dir) / tuning.RESULTS_FILE)


def test_search_runs_asha_trials_with_a_nested_mlflow_run_each(search):
    cfg, client = search.cfg, search.client
    rows = _results(cfg)
    assert len(rows) == 2
    assert sorted(row["perceptual.layers"] for row in rows) == ["block1,block6", "vae123"]
    for key in ("loss.kl_weight", "loss.perceptual_weight"):
        assert len({row[key] for row in rows}) == 2
    # ASHA: a trial ran all tune.steps, or was stopped at the rung at the grace period.
    for row in rows:
        assert (row["status"], int(row["steps"])) in {("completed", 4), ("stopped", 2)}, row
        assert math.isfinite(float(row["objective"]))

    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    parents = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tune'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the restored search kept its run
    parent = parents[0].info.run_id
    assert sorted(a.path for a in client.list_artifacts(parent, "tune")) == [
        "tune/best_overrides.json",
        "tune/results.csv",
    ]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(run.data.tags["tune.trial_id"] for run in children) == sorted(row["trial_id"] for row in rows)
    by_trial = {row["trial_id"]: row for row in rows}
    for run in children:
        row = by_trial[run.data.tags["tune.trial_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["tune.status"] == row["status"]
        # The trial's own values as params, and its metrics and grids at every report.
        assert math.isclose(float(run.data.params["loss.kl_weight"]), float(row["loss.kl_weight"]))
        assert run.data.params["perceptual.layers"] == row["perceptual.layers"]
        assert run.data.params["train.steps"] == "4"
        history = client.get_metric_history(run.info.run_id, tuning.OBJECTIVE)
        assert sorted({m.step for m in history}) == list(range(2, int(row["steps"]) + 1, 2))
        assert math.isclose(max(history, key=lambda m: m.step).value, float(row["objective"]), rel_tol=1e-9)
        grids = [a.path for a in client.list_artifacts(run.info.run_id, "grids/samples")]
        assert len(grids) == int(row["steps"]) // 2


def test_best_overrides_name_the_trial_with_the_best_objective(search):
    cfg = search.cfg
    written = json.loads(cfg.tune.best_overrides_path.read_text())
    # Against Tune's own per-trial record (result.json in each trial folder), not our table.
    finals = {}
    for trial_dir in tuning.experiment_path(cfg).iterdir():
        if (trial_dir / "result.json").is_file():
            last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
            finals[last["trial_id"]] = last
    assert len(finals) == 2
    full = [r for r in finals.values() if r["step"] >= cfg.tune.steps]  # stopped trials are not comparable
    # Ties go to the smaller trial id, as best_trial's: after 4 steps the default's decoder still
    # draws flat grey images (its untrained output is about 2e-4), so both trials can score the same.
    winner = min(full, key=lambda r: (r[tuning.OBJECTIVE], r["trial_id"]))
    assert written["trial_id"] == winner["trial_id"] and written["metric"] == tuning.OBJECTIVE
    assert math.isclose(written["objective"], winner[tuning.OBJECTIVE])
    assert written["overrides"] == {key: winner["config"][key] for key in cfg.tune.space}
    assert written["objective"] == min(float(row["objective"]) for row in _results(cfg) if row["status"] == "completed")
    # The train stage takes them over params.yaml; with tuning off, params.yaml alone.
    final = with_best_overrides(cfg)
    assert final.loss.kl_weight == winner["config"]["loss.kl_weight"]
    assert final.perceptual.layers == tuple(
        [winner["config"]["perceptual.layers"]]
        if isinstance(winner["config"]["perceptual.layers"], str)
        else winner["config"]["perceptual.layers"]
    )
    off = cfg.with_overrides({"tune.enabled": False})
    assert with_best_overrides(off) == off


def test_only_a_trial_that_completed_the_budget_with_a_finite_objective_can_win():
    def row(trial_id, objective, status):
        return {
            "trial_id": trial_id,
            "objective": objective,
            "status": status,
            "steps": 4 if status == "completed" else 1,
        }

    rows = [
        row("a", 100.0, "error"),  # reported once, then raised: its early number is lowest
        row("b", 150.0, "stopped"),  # stopped by ASHA after fewer steps
        row("c", float("nan"), "completed"),
        row("d", 400.0, "completed"),
        row("e", 300.0, "completed"),
    ]
    assert tuning.best_trial(rows)["trial_id"] == "e"
    with pytest.raises(
        RuntimeError, match=r"no trial completed tune.steps .* \(0 completed, 1 stopped early, 1 errored of 2\)"
    ):
        tuning.best_trial(rows[:2])


def test_the_driver_sets_each_trial_runs_final_status_from_tunes_outcome(tmp_path):
    """An errored trial's run ends FAILED, a completed or stopped one's FINISHED, each tagged with
    Tune's status; a run the trial left RUNNING (it writes nothing when it fails) is closed too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("trials")
    statuses = ("error", "stopped", "completed")
    rows = [{"trial_id": s, "status": s, "run_id": client.create_run(experiment).info.run_id} for s in statuses]
    rows.append({"trial_id": "never-started", "status": "error", "run_id": ""})  # no run: nothing to close
    tuning.close_trial_runs(rows, uri)
    runs = {row["status"]: client.get_run(row["run_id"]) for row in rows[:3]}
    assert {s: run.info.status for s, run in runs.items()} == {
        "error": "FAILED",
        "stopped": "FINISHED",
        "completed": "FINISHED",
    }
    assert all(run.data.tags["tune.status"] == s for s, run in runs.items())


def test_a_failed_search_sets_its_trials_runs_still_running_killed(tmp_path):
    """The search raised before close_trial_runs: no trial run is left RUNNING, a closed one keeps
    its status, and a restart of the trial (trial_run) sets its run RUNNING again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("trials")
    runs = {}
    for trial_id, status in (("t1", "RUNNING"), ("t2", "FINISHED"), ("t3", "RUNNING")):
        runs[trial_id] = client.create_run(experiment_id).info.run_id
        if status != "RUNNING":
            client.set_terminated(runs[trial_id], status)
        (tmp_path / "exp" / trial_id).mkdir(parents=True)
        (tmp_path / "exp" / trial_id / tuning.RUN_FILE).write_text(json.dumps({"run_id": runs[trial_id]}))
    assert sorted(tuning.kill_open_trial_runs(tmp_path / "exp", uri)) == sorted([runs["t1"], runs["t3"]])
    status = {t: client.get_run(run_id).info.status for t, run_id in runs.items()}
    assert status == {"t1": "KILLED", "t2": "FINISHED", "t3": "KILLED"}
    assert tuning.trial_run(None, "t1", tmp_path / "exp" / "t1", uri, "") == runs["t1"]
    assert client.get_run(runs["t1"]).info.status == "RUNNING"


def test_killed_search_resumes_without_rerunning_a_finished_trial(search):
    cfg = search.cfg
    assert "restoring the interrupted search" in search.restored.stdout
    rows = {row["trial_id"]: row for row in _results(cfg)}
    assert search.finished in rows and len(rows) == 2
    # The finished trial was not trained again: its Tune record and its Ray Train reports are
    # byte for byte those from before the kill, one report per report_every steps, none restored.
    trial_dir = tuning.experiment_path(cfg) / search.finished
    for name, content in search.before.items():
        assert (trial_dir / name).read_bytes() == content, name
    reports = [json.loads(line) for line in search.before["train/reports.jsonl"].decode().splitlines()]
    steps = int(rows[search.finished]["steps"])
    assert [(r["step"], r["restored_from"]) for r in reports] == [(s, 0) for s in range(2, steps + 1, 2)]
    last = json.loads(search.before["result.json"].decode().splitlines()[-1])
    assert math.isclose(float(rows[search.finished]["objective"]), last[tuning.OBJECTIVE])


def test_tuning_off_writes_empty_overrides_and_a_header_only_table(synthetic_cfg, tmp_path):
    cfg = search_config(synthetic_cfg, tmp_path, **{"tune.enabled": False})
    assert tune(cfg) == {"overrides": {}}
    assert json.loads(cfg.tune.best_overrides_path.read_text()) == {"overrides": {}}
    header = (Path(cfg.tune.out_dir) / tuning.RESULTS_FILE).read_text().splitlines()
    assert header == ["trial_id,loss.kl_weight,loss.perceptual_weight,perceptual.layers,objective,steps,status"]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"loss.kl_wieght": {"loguniform": [0.1, 1.0]}}, "kl_wieght"),
        ({"loss.kl_weight": {"lognormal": [0.1, 1.0]}}, "loguniform | uniform | choice | grid"),
        ({"loss.kl_weight": {"loguniform": [0.0, 1.0]}}, "0 < low < high"),
        ({"perceptual.layers": {"choice": ["vae123", "relu9_9"]}}, "relu9_9"),
        ({"model.latent_dim": {"uniform": [8, 16]}}, "expected an integer"),
        ({"train.steps": {"choice": [10, 20]}}, "not searchable"),
    ],
)
def test_a_bad_search_space_fails_before_any_trial_naming_the_key(synthetic_cfg, tmp_path, space, message):
    cfg = search_config(synthetic_cfg, tmp_path, **{"tune.space": space})
    with pytest.raises(ConfigError, match=message):
        tuning.parse_space(cfg)


def test_a_search_is_restored_only_over_the_same_data_wherever_the_checkout_lies(synthetic_cfg, tmp_path):
    """The experiment's name keys on settings, data and code: a checkout elsewhere finds its search
    again; new shards at the same path are a new search, never one whose trials saw other data."""
    import shutil

    from dfcvae.sharding import write_shards

    here = search_config(synthetic_cfg, tmp_path / "here")
    elsewhere = search_config(synthetic_cfg, tmp_path / "elsewhere")
    assert tuning.experiment_name(here) == tuning.experiment_name(elsewhere)
    assert tuning.experiment_path(here) != tuning.experiment_path(elsewhere)
    copy = tmp_path / "shards"
    shutil.copytree(synthetic_cfg.data.shards_dir, copy)
    moved = here.with_overrides({"data.shards_dir": str(copy)})
    assert tuning.experiment_name(moved) == tuning.experiment_name(here)  # the same shards elsewhere
    resharded = moved.with_overrides({"data.seed": 1})  # another order of the same images: other shards
    write_shards(resharded)
    assert tuning.experiment_name(resharded.with_overrides({"data.seed": 0})) != tuning.experiment_name(here)
