"""pipeline.retrain says what DVC said when it cannot run, in one line."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def retrain(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.retrain"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_outside_a_dvc_repository_retrain_says_so(tmp_path):
    result = retrain(tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "retrain: `dvc status --json` failed: you are not inside of a DVC repository")


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
    assert last.startswith("retrain: `dvc status --json` failed: Unable to acquire lock. Most likely another DVC "
                           "process is running"), last
