"""What every stage's main() shares: config from params.yaml plus CLI overrides, one-line errors."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

from dfcvae.config import Config, ConfigError, UserError, load_yaml


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
            except OSError as err:  # the machine's, not the project's: a full disk, a permission
                raise SystemExit(f"{name}: {os_error_sentence(err)}") from None
            except Exception as err:
                mlflow_errors = sys.modules.get("mlflow.exceptions")  # loaded if MLflow was used
                if mlflow_errors and isinstance(err, mlflow_errors.MlflowException):
                    raise SystemExit(f"{name}: MLflow: {err.message.splitlines()[0]}") from None
                raise

        return run

    return wrap


ADVICE = {
    errno.ENOSPC: "free space there, or point the output at a larger disk, and run again",
    errno.EDQUOT: "free space within your quota, or point the output elsewhere, and run again",
    errno.EACCES: "give yourself permission there, or point the path elsewhere",
    errno.EROFS: "the file system is read-only: point the path at a writable one",
}


def os_error_sentence(err: OSError) -> str:
    """One sentence for an operating-system error: what, where, and what to do."""
    where = f" at {err.filename}" if err.filename else ""
    advice = ADVICE.get(err.errno, "fix that, and run again")
    return f"{err.strerror or err}{where}: {advice}."


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
