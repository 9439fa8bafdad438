"""End to end: the demo command in a fresh git repo, `dvc` bookkeeping, retraining.

A smaller variant of the demo profile (extra `-S` overrides) keeps this within CI's budget;
the mechanism is the one `make demo` uses: `python -m pipeline.demo` -> `dvc exp run -S`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_until
from tests.pipeline_repo import SMALL, _env, _params, _registration, _run, _stale, copy_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git repo holding the project's files, after the (small) demo ran in it."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    copy_project(root)
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "project"], root)
    extra = [a for k, v in SMALL.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    _run([sys.executable, "-m", "pipeline.demo", *extra], root, timeout=1200)
    return root


def test_demo_ends_with_champion_with_grids_and_clean_status(repo):
    import mlflow

    registration = _registration(repo)
    assert registration["decision"] == "promoted" and registration["champion_version"] == registration["version"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'outputs/mlflow/mlflow.db'}")
    champion = client.get_model_version_by_alias(_params(repo)["registry"]["model_name"], "champion")
    assert str(champion.version) == str(registration["version"])
    # Lineage: the train stage logged the shards it read as the run's input (tests/test_registry.py has the rest).
    shards = repo / _params(repo)["data"]["shards_dir"]
    inputs = client.get_run(champion.run_id).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [(shards / "manifest.sha256").read_text()[:36]]
    assert _stale(repo) == set()
    shown = _run(["dvc", "metrics", "show"], repo)
    assert "outputs/eval/metrics.json" in shown and "fid" in shown
    for picture in ("samples", "reconstructions", "interpolations", "attribute_arithmetic"):
        assert (repo / "outputs/eval" / f"{picture}.png").stat().st_size > 0
    # The committed params.yaml is the real job; the demo's values are in the workspace only.
    committed = yaml.safe_load(
        subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=repo, capture_output=True, text=True, check=True).stdout
    )
    assert committed["data"]["source"] == "celeba" and _params(repo)["data"]["source"] == "synthetic"


def test_loss_weight_change_reruns_from_tune_not_fetch_or_shard(repo):
    original = (repo / "params.yaml").read_text()
    params = _params(repo)
    params["loss"]["kl_weight"] = params["loss"]["kl_weight"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # The stages that read the loss are stale; evaluate and register follow once train
        # has written a new model.pt (DVC only knows that after running train).
        assert _stale(repo) == {"tune", "train"}
        dry = _run(["dvc", "repro", "--dry"], repo)
        assert "Stage 'fetch' didn't change" in dry and "Stage 'shard' didn't change" in dry
        assert "Running stage 'tune'" in dry and "Running stage 'train'" in dry
    finally:
        (repo / "params.yaml").write_text(original)
    assert _stale(repo) == set()


@pytest.mark.parametrize(
    ("code", "users"),
    [
        ("dfcvae/weights.py", {"tune", "train", "evaluate", "register"}),
        ("dfcvae/model.py", {"tune", "train", "evaluate", "register"}),
        ("dfcvae/shards/format.py", {"fetch", "shard", "tune", "train", "evaluate", "register"}),
        ("dfcvae/shards/loader.py", {"tune", "train", "evaluate", "register"}),
    ],
)
def test_changed_library_code_makes_every_stage_that_uses_it_stale(repo, code, users):
    """dvc.yaml's deps are exact: editing a module stales the stages whose code imports it."""
    path = repo / code
    original = path.read_text()
    path.write_text(original + "\n# changed\n")
    try:
        assert _stale(repo) == users
    finally:
        path.write_text(original)
    assert _stale(repo) == set()


def test_the_files_that_describe_a_model_come_back_with_it_from_dvcs_cache(repo):
    """What `dvc exp apply` and `dvc pull` restore: run.json, metrics and registration.json with model.pt."""
    names = (
        "outputs/train/model.pt",
        "outputs/train/run.json",
        "outputs/train/metrics.json",
        "outputs/eval/metrics.json",
        "outputs/register/registration.json",
    )
    before = {name: (repo / name).read_bytes() for name in names}
    for name in names:
        (repo / name).unlink()
    _run(["dvc", "checkout"], repo)
    assert {name: (repo / name).read_bytes() for name in names} == before
    assert _stale(repo) == set()


def test_a_tagged_model_version_comes_back_by_name_with_dvc_artifacts_get(repo, tmp_path):
    """dvc.yaml's `artifacts:` entry: a git tag in GTO's form names a version of model.pt."""
    _run(["git", "add", "dvc.lock"], repo)
    _run(["git", "commit", "-qm", "a trained model"], repo)
    _run(["git", "tag", "-a", "dfcvae@v0.1.0", "-m", "Registering artifact dfcvae version v0.1.0"], repo)
    _run(["dvc", "artifacts", "get", str(repo), "dfcvae", "-o", str(tmp_path / "model.pt")], tmp_path)
    assert (tmp_path / "model.pt").read_bytes() == (repo / "outputs/train/model.pt").read_bytes()


def test_retrain_is_idle_without_change_then_resumes_interrupted_run_on_new_data(repo):
    assert "nothing to do" in _run([sys.executable, "-m", "pipeline.retrain"], repo)
    first = _registration(repo)
    params = _params(repo)
    params["data"]["synthetic_count"] += 60  # the generator is deterministic per image: these are added images
    params["tune"]["enabled"] = False  # the demo above searched; here one Ray run less keeps CI's budget
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    _kill_repro_during_train(repo)
    finished = _lock_entries(repo, ("fetch", "shard", "tune"))
    out = _run([sys.executable, "-m", "pipeline.retrain"], repo, timeout=1200)
    assert "reproducing" in out
    assert _lock_entries(repo, ("fetch", "shard", "tune")) == finished
    second = _registration(repo)
    assert second["version"] != first["version"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'outputs/mlflow/mlflow.db'}")
    challenger = client.get_model_version_by_alias(params["registry"]["model_name"], "challenger")
    assert str(challenger.version) == str(second["version"])
    assert _stale(repo) == set()


def _kill_repro_during_train(repo: Path) -> None:
    """Start `dvc repro`, SIGKILL it once tune is done and train has written a checkpoint."""
    tune_before = _lock_entries(repo, ("tune",))["tune"]
    runs_before = set((repo / "outputs/ray").glob("train-*"))
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def train_checkpointed() -> bool:
        new_runs = set((repo / "outputs/ray").glob("train-*")) - runs_before
        tune_done = _lock_entries(repo, ("tune",))["tune"] != tune_before
        return tune_done and any(list(run.glob("checkpoint_*/checkpoint.pt")) for run in new_runs)

    try:
        wait_until(train_checkpointed, "a checkpoint of the train stage in dvc repro", process=proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _lock_entries(repo: Path, stages: tuple[str, ...]) -> dict[str, dict]:
    try:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    except (yaml.YAMLError, KeyError, TypeError):  # caught mid-write
        lock = {}
    return {s: lock.get(s) for s in stages}
