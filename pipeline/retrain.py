"""Scheduled retraining: pull what is new, reproduce what it affects, register a challenger.

    python -m pipeline.retrain [--push]

1. `dvc pull` when a DVC remote is configured (new data and cache from other machines);
2. `dvc status`: when data, params and code all match dvc.lock, and the files of
   data.folder_dir or data.celeba_dir are those the last fetch read (which DVC does not track:
   they may lie outside the repository), stop and say so; new files there run fetch again;
3. `dvc repro`: only the affected stages run; the register stage logs a challenger
   and moves `champion` only if it wins on the same evaluation;
4. with --push: `dvc push`, then commit dvc.lock and push it with git.
The same entrypoint runs from cron, a systemd timer or the Kubernetes CronJob in infra/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dfcvae.config import Config, UserError
from dfcvae.fetch import inputs_changed
from pipeline.common import command


def dvc(*args: str, capture: bool = False) -> str:
    """Run `dvc ARGS`; -> its stdout when capture. A failure is a UserError carrying DVC's own reason
    (another `dvc repro` holding the lock, not a DVC repository, ...)."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE,
    )
    if not capture and result.stderr:
        sys.stderr.write(result.stderr)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip() and not line.startswith("+")]
        reason = next(
            (line.removeprefix("ERROR: ") for line in reversed(lines) if line.startswith("ERROR")),
            lines[-1] if lines else f"exit status {result.returncode}",
        )
        raise UserError(f"`dvc {' '.join(args)}` failed: {reason}")
    return result.stdout if capture else ""


def has_remote() -> bool:
    return bool(dvc("remote", "list", capture=True).strip())


def stale_stages() -> list[str]:
    status = json.loads(dvc("status", "--json", capture=True) or "{}")
    return sorted(status)


def git(*args: str) -> None:
    subprocess.run(["git", *args], check=True)


def retrain(push: bool, params: Path = Path("params.yaml")) -> bool:
    """Return True when something was retrained."""
    if has_remote():
        dvc("pull", "--allow-missing")
    new_images = inputs_changed(Config.load(params)) if params.is_file() else None
    stale = stale_stages()
    if not stale and not new_images:
        print("retrain: nothing changed (data, params and code match dvc.lock); nothing to do.")
        return False
    if new_images:  # DVC does not track the source folder itself: fetch again, then the rest follows
        print(f"retrain: {new_images}; fetching them again.", flush=True)
        dvc("repro", "--force", "--single-item", "fetch")
        stale = sorted(set(stale) | set(stale_stages()) | {"fetch"})
    print(f"retrain: changed: {', '.join(stale)}; reproducing the affected stages.", flush=True)
    dvc("repro")
    if push:
        if has_remote():
            dvc("push")
        git("add", "dvc.lock")
        git("commit", "-m", "retrain: update dvc.lock")
        git("push")
    return True


@command("retrain")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--push", action="store_true", help="push outputs to the DVC remote and dvc.lock to git")
    args = parser.parse_args(argv)
    retrain(args.push)


if __name__ == "__main__":
    main(sys.argv[1:])
