"""Scheduled retraining: pull what is new, reproduce what it affects, register a challenger.

    python -m pipeline.retrain [--push]

1. `dvc pull` when a DVC remote is configured (new data and cache from other machines);
2. `dvc status`: when data, params and code all match dvc.lock, stop and say so;
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
from pipeline.common import command


def dvc(*args: str, capture: bool = False) -> str:
    result = subprocess.run(["dvc", *args], check=True, text=True, capture_output=capture)
    return result.stdout if capture else ""


def has_remote() -> bool:
    return bool(dvc("remote", "list", capture=True).strip())


def stale_stages() -> list[str]:
    status = json.loads(dvc("status", "--json", capture=True) or "{}")
    return sorted(status)


def git(*args: str) -> None:
    subprocess.run(["git", *args], check=True)


def retrain(push: bool) -> bool:
    """Return True when something was retrained."""
    if has_remote():
        dvc("pull", "--allow-missing")
    stale = stale_stages()
    if not stale:
        print("retrain: nothing changed (data, params and code match dvc.lock); nothing to do.")
        return False
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
