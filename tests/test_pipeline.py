"""End to end: the demo command in a fresh git repo, `dvc` bookkeeping, retraining.

A smaller variant of the demo profile (extra `-S` overrides) keeps this within CI's budget;
the mechanism is the one `make demo` uses: `python -m pipeline.demo` -> `dvc exp run -S`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SMALL = {
    "data.synthetic_count": 240,
    "data.samples_per_shard": 40,
    "loader.batch_size": 16,
    "train.steps": 30,
    "train.log_every": 10,
    "train.val_every": 15,
    "train.checkpoint_every": 15,
    "train.grid_every": 30,
    "tune.num_samples": 1,  # the search itself is tests/test_tune.py's; here the stage runs once
    "tune.steps": 4,
    "tune.report_every": 2,
    "tune.grace_period": 2,
    "eval.num_samples": 32,
    "eval.val_subset": 16,
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost"
    )
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def copy_project(root: Path) -> None:
    """The project's files (tracked, and untracked but not ignored) into root."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)


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


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _stale(root: Path) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], root) or "{}"))


def _registration(root: Path) -> dict:
    return json.loads((root / "outputs/register/registration.json").read_text())


def test_demo_ends_with_champion_with_grids_and_clean_status(repo):
    import mlflow

    registration = _registration(repo)
    assert registration["decision"] == "promoted" and registration["champion_version"] == registration["version"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'outputs/mlflow/mlflow.db'}")
    champion = client.get_model_version_by_alias(_params(repo)["registry"]["model_name"], "champion")
    assert str(champion.version) == str(registration["version"])
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
        ("dfcvae/data.py", {"fetch", "shard", "tune", "train", "evaluate", "register"}),
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


@pytest.fixture(scope="module")
def folder_repo(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """A repo whose data is a folder of photographs outside it, reproduced to a champion; and the
    photographs held back to be added later."""
    base = tmp_path_factory.mktemp("folder")
    photos, held = base / "photos", base / "held"
    _run([sys.executable, "-m", "bench.photos", "--out", str(photos), "--count", "100", "--size", "80"], ROOT)
    held.mkdir()
    added = []
    for path in sorted(photos.iterdir())[-25:]:
        added.append(held / path.name)
        path.rename(added[-1])
    root = base / "repo"
    copy_project(root)
    profile = yaml.safe_load((ROOT / "pipeline/demo.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in {
        **profile,
        **SMALL,
        "data.source": "folder",
        "data.folder_dir": str(photos),
        "data.image_size": 32,
        "model.hidden_channels": [8, 16],
        "model.latent_dim": 8,
        "tune.enabled": False,
        "eval.num_samples": 16,
        "eval.val_subset": 8,
    }.items():
        section, _, field = key.partition(".")
        params[section][field] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "project"], root)
    _run(["dvc", "repro"], root, timeout=1200)
    return root, photos, added


def test_retrain_on_new_images_trains_anew_reevaluates_the_champion_then_idles(folder_repo):
    root, photos, added = folder_repo
    first = _registration(root)
    assert first["decision"] == "promoted"
    assert "nothing to do" in _run([sys.executable, "-m", "pipeline.retrain"], root)
    manifest = json.loads((root / "data/shards/manifest.json").read_text())

    for path in added:  # new photographs in the user's folder, outside the repository
        path.rename(photos / path.name)
    out = _run([sys.executable, "-m", "pipeline.retrain"], root, timeout=1200)
    assert "were added, removed or changed since the last fetch" in out
    new_manifest = json.loads((root / "data/shards/manifest.json").read_text())
    assert (
        sum(s["count"] for s in new_manifest["splits"].values())
        == 100
        > sum(s["count"] for s in manifest["splits"].values())
    )
    # A new run on the new data, all its steps: not the old run resumed.
    steps = _params(root)["train"]["steps"]
    reports = [json.loads(line) for line in (root / "outputs/train/reports.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in reports) == steps and all(r["restored_from"] == 0 for r in reports)
    second = _registration(root)
    assert second["version"] == first["version"] + 1
    # The old champion was evaluated again on the new evaluation, and the decision follows those numbers.
    assert f"the champion was evaluated again like v{second['version']}" in second["reason"]
    assert second["champion_scored_again"] and second["champion_objective"] != first["challenger_objective"]
    # Promoted only on evidence: the bound of the paired difference below -registry.min_improvement.
    better = second["difference_interval"][1] < -second["min_improvement"]
    assert second["decision"] == ("promoted" if better else "kept")
    assert _stale(root) == set()
    assert "nothing to do" in _run([sys.executable, "-m", "pipeline.retrain"], root)
