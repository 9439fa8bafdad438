"""What the end-to-end tests share: a copy of the project in a fresh folder and commands run in it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

# The demo profile made smaller still (extra `-S` overrides), within CI's budget.
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


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _stale(root: Path) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], root) or "{}"))


def _registration(root: Path) -> dict:
    return json.loads((root / "outputs/register/registration.json").read_text())
