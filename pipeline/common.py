"""What every stage's main() shares: config from params.yaml plus CLI overrides, and Ray."""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfcvae.config import Config, ConfigError, UserError, load_yaml

# "0" keeps a Ray cluster on this machine, bound to 127.0.0.1 (`ray start` needs it too).
SINGLE_MACHINE_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorates a command's main(): a user's mistake (UserError, a missing file) ends the process
    with one line, `<name>: <what is wrong and what to do>`, exit status 1, no traceback.
    Anything else is a bug and keeps its traceback."""

    def wrap(main: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> None:
            try:
                main(*args, **kwargs)
            except (UserError, FileNotFoundError) as err:
                raise SystemExit(f"{name}: {err}") from None

        return run

    return wrap


def parse_config(
    description: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """params.yaml (--params) with --set overrides; add_arguments adds a command's own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
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
        overrides[key.strip()] = load_yaml(value)
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
        start_local_ray()


def start_local_ray(num_cpus: int | None = None) -> str:
    """A local cluster with its dashboard on 127.0.0.1; returns its GCS address for drivers to join.

    The dashboard stays on: without it, trials stopped early leak placement groups. Ray Train's
    placement-group cleaner asks the State API whether its controller is alive; it finds the API
    through RAY_API_SERVER_ADDRESS, set before ray.init so every Ray process inherits this
    cluster's address. Without it the cleaner asks whatever /tmp/ray/ray_current_cluster names,
    and every run's shutdown waits out its 12 s timeout.
    """
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # One machine is never partly preempted; the watcher would be one more process per run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    loopback_only_ray()
    import ray

    context = ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
    )
    return context.address_info["gcs_address"]


def loopback_only_ray() -> None:
    """Ray's single-machine mode (its default on macOS and Windows) for clusters started here.

    The node's address becomes 127.0.0.1, so the GCS, raylet, agents and workers bind loopback
    only; otherwise they bind every interface whatever --node-ip-address says. Ray reads the
    switch when it is imported: the variable reaches the processes the cluster starts, and the
    constant covers this process if it imported Ray already.
    """
    os.environ[SINGLE_MACHINE_RAY] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
