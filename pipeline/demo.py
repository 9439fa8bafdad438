"""The offline demo: the whole pipeline, fetch to a registered champion, on 2 CPU cores.

Applies the demo profile (pipeline/demo.yaml) with `dvc exp run -S key=value`, DVC's own
way to vary params: the committed params.yaml stays the real job in git history, the
workspace holds the demo's values and results afterwards (`git checkout params.yaml`
returns to the real job; `dvc exp show` lists the runs).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dfcvae import tracking
from dfcvae.config import Config, load_yaml
from pipeline.common import command

PROFILE = Path(__file__).with_name("demo.yaml")


def profile_overrides(path: Path = PROFILE, params: Path = Path("params.yaml")) -> list[str]:
    """The profile as `-S` arguments, validated against the config first (a typo fails here)."""
    overrides = load_yaml(path.read_text())
    Config.load(params).with_overrides(overrides)
    args = []
    for key, value in overrides.items():
        if isinstance(value, dict):  # replaced, not merged into params.yaml's mapping: delete, then add
            args += [f"~{key}", f"+{key}={override_value(value)}"]
        else:
            args.append(f"{key}={override_value(value)}")
    return args


def override_value(value: object) -> str:
    """A YAML value in the override grammar `dvc exp run -S` parses (Hydra's): mapping keys
    unquoted, so a dotted key such as tune.space's `loss.kl_weight` stays one key."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {override_value(v)}" for key, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(override_value(v) for v in value) + "]"
    return json.dumps(value)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


@command("demo")
def main(argv: list[str] | None = None) -> None:
    extra = argv if argv is not None else sys.argv[1:]  # further -S overrides, e.g. -S train.steps=100
    # Experiments are git commits under refs/exps: give them an author on machines without one.
    for var, value in (("GIT_AUTHOR_NAME", "dfcvae"), ("GIT_AUTHOR_EMAIL", "dfcvae@localhost")):
        os.environ.setdefault(var, value)
        os.environ.setdefault(var.replace("AUTHOR", "COMMITTER"), value)
    start = time.perf_counter()
    args = [a for pair in profile_overrides() for a in ("-S", pair)]
    run(["dvc", "exp", "run", *args, *extra])
    run(["dvc", "metrics", "show"])
    cfg = Config.load()
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\ndemo finished in {minutes:.1f} min.\n"
        f"  pictures:  {cfg.eval.out_dir}/*.png\n"
        f"  registry:  {cfg.registry.out_dir}/registration.json\n"
        f"  MLflow UI: {shlex.join(tracking.ui_command(cfg.mlflow))}\n"
        f"  curves:    dvc plots show  (writes dvc_plots/index.html)"
    )


if __name__ == "__main__":
    main()
