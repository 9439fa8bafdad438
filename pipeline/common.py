"""What every stage's main() shares: config from params.yaml plus CLI overrides, and Ray."""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dfcvae.config import Config, ConfigError


def parse_config(
    description: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """params.yaml (--params) with --set overrides; add_arguments adds a command's own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a params key, e.g. --set loss.kl_weight=0.5 (value parsed as YAML)",
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    return Config.load(args.params).with_overrides(parse_overrides(args.set)), args


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.steps=100.")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def best_overrides(cfg: Config) -> dict | None:
    """The tune stage's best trial's overrides; None when tuning is off or has not run."""
    path = cfg.tune.best_overrides_path
    if not cfg.tune.enabled or not path.is_file():
        return None
    return json.loads(path.read_text())["overrides"]


def with_best_overrides(cfg: Config) -> Config:
    """The tune stage's best trial over params.yaml, when tuning is on."""
    if not cfg.tune.enabled:
        return cfg
    overrides = best_overrides(cfg)
    if overrides is None:
        raise FileNotFoundError(
            f"{cfg.tune.best_overrides_path} is missing: run the tune stage first, or set tune.enabled: false."
        )
    return cfg.with_overrides(overrides)


def init_ray(cfg: Config) -> None:
    """Join the cluster in RAY_ADDRESS (or the job's), else start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # The dashboard stays on: without it, trials stopped early leak placement groups.
        # Ray's cleanup actors find it through RAY_API_SERVER_ADDRESS; set before ray.init so
        # every Ray process inherits this cluster's address, not a stale one from /tmp/ray.
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 log_to_driver=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
