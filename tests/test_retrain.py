"""pipeline.retrain says what DVC said when it cannot run, in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def retrain(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.retrain"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_outside_a_dvc_repository_retrain_says_so(tmp_path):
    result = retrain(tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("retrain: `dvc status --json` failed: you are not inside of a DVC repository")
    )


@pytest.mark.slow
def test_while_another_dvc_process_holds_the_repository_retrain_gives_dvcs_reason(tmp_path):
    from dvc.lock import make_lock

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    lock = make_lock(str(tmp_path / ".dvc" / "tmp" / "lock"), tmp_dir=str(tmp_path / ".dvc" / "tmp"))
    lock.lock()  # as a running `dvc repro` holds it
    try:
        result = retrain(tmp_path)
    finally:
        lock.unlock()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "retrain: `dvc status --json` failed: Unable to acquire lock. Most likely another DVC process is running"
    ), last


@pytest.mark.slow
def test_new_images_in_the_source_folder_are_fetched_again_and_no_change_is_nothing_to_do(tmp_path):
    """The real fetch stage of dvc.yaml in a fresh repo, on a folder of images outside it."""
    import yaml
    from PIL import Image

    photos, repo = tmp_path / "photos", tmp_path / "repo"
    photos.mkdir()
    for i in range(10):  # the split is a hash of each file's content: these ten fill all three splits
        Image.new("RGB", (160, 160), (25 * i, 90, 200)).save(photos / f"{i}.png")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fetch": stages["fetch"]}}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", folder_dir=str(photos), split_fractions=[0.34, 0.33, 0.33])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in stages["fetch"]["deps"]:  # the stage's code, as its deps name it
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes((ROOT / name).read_bytes())
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "repro", "-q"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "nothing to do" in retrain(repo).stdout

    Image.new("RGB", (160, 160), (0, 0, 0)).save(photos / "added.png")
    result = retrain(repo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"files in data.folder_dir ({photos}) changed since the last fetch (1 added" in result.stdout
    import pyarrow.parquet as pq

    assert pq.read_table(repo / "data/inventory/images.parquet").num_rows == 11  # listed, not copied
    again = retrain(repo)
    assert "nothing to do" in again.stdout, again.stdout + again.stderr
