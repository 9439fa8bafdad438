"""The MLflow model registry: registration and the gated champion.

The one module that talks to the registry.

The served model itself (`VAEModel`, its signature, how it is logged) is dfcvae/served.py.

**Registration.** `register_model` refuses a failed or unfinished training run, non-finite
metrics or weights, then logs the model on the training run, registers it under
`registry.model_name`, and attaches the evaluation grids, metrics.json and the training
config (model artifacts), plus the data manifest hash, git commit and objective (version
tags). Every new version gets alias `challenger`; `champion` moves to it only if its
objective (`eval.objective`, lower is better) beats the current champion's on the same
evaluation, or there is no champion. "The same evaluation" is `evaluation_key`: the eval
settings that change the objective's value plus the data manifest hash. A champion evaluated
differently (the data grew, say) is evaluated again on the challenger's evaluation first, and
the two compared on that. A model whose posterior collapsed (active latent fraction under
registry.min_active_fraction) is never promoted. The decision and both numbers go into the
version's description and the returned `Registration`.

**Concurrency.** MLflow has no compare-and-set for aliases, so the version creation, the
champion comparison and the alias moves run under one exclusive file lock (`fcntl.flock`):
concurrent registrations get distinct versions and the champion is always the best version
compared so far. With a SQLite store the lock file sits beside the database, so every process
sharing that store shares the lock; with a tracking server it is `registry.lock_file`, which
must be on a filesystem shared by all registering machines. Logging the model (the slow
upload) runs outside the lock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from dfcvae.checkpoint import all_finite, load_checkpoint, load_model
from dfcvae.config import Config, UserError
from dfcvae.sampler import SAMPLER_FILE
from dfcvae.served import VAEModel, log_model  # noqa: F401 (VAEModel: older registered models name it here)

CHAMPION = "champion"
CHALLENGER = "challenger"
ACTIVE_FRACTION = "test/active_fraction"  # the evaluation's share of active latent units
# Eval settings that do not change the objective's value, left out of the evaluation key.
# (probe_train_samples counts: the Gaussian mixture sampler is fit on that many train latents.)
EVAL_KEY_IGNORES = ("batch_size", "out_dir", "probe_attributes", "arithmetic_attributes", "lpips_net", "lpips_weights")


class RegistrationError(UserError, ValueError):
    """Registration refused: the run, its metrics or its weights are not fit to serve."""


# ---------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registration:
    """One registration's outcome; `pipeline.register` writes it as registration.json."""

    model_name: str
    version: int
    decision: str  # "promoted" (champion moved to this version) | "kept"
    reason: str  # the sentence in the version's description
    objective: str  # eval.objective; lower is better
    challenger_objective: float  # this version's
    champion_objective: float | None  # the champion's it was compared with; None: no champion
    previous_champion_version: int | None
    champion_version: int | None  # after this registration; None: still no champion
    run_id: str


def evaluation_key(cfg: Config, manifest_hash: str) -> str:
    """Identifies an evaluation: objectives with different keys are not comparable."""
    settings = {k: v for k, v in cfg.to_dict()["eval"].items() if k not in EVAL_KEY_IGNORES}
    settings |= {"image_size": cfg.data.image_size, "manifest_hash": manifest_hash}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def data_manifest_hash(cfg: Config) -> str:
    """The shard set's manifest hash; "unknown" only when there is no manifest at all."""
    from dfcvae import data

    try:
        return data.manifest_hash(cfg)
    except data.DataError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return "unknown"
        raise


def read_metrics(metrics_path: Path, objective: str) -> dict[str, Any]:
    """metrics.json, refused if any number in it is non-finite or the objective is missing."""
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: run the evaluate stage first.")
    metrics = json.loads(metrics_path.read_text())
    bad = sorted(k for k, v in _numbers(metrics) if not math.isfinite(v))
    if bad:
        raise RegistrationError(f"refusing to register: {metrics_path} has non-finite metrics ({', '.join(bad)}).")
    if not isinstance(metrics.get(objective), (int, float)) or isinstance(metrics.get(objective), bool):
        raise RegistrationError(f"{metrics_path} has no number for the objective '{objective}' (eval.objective).")
    return metrics


def _numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}{key}/" if isinstance(value, (dict, list)) else f"{prefix}{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{prefix}{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix.rstrip("/"), float(tree)


def check_run(client: MlflowClient, run_id: str) -> None:
    """Only a finished run whose logged metrics are all finite may be registered."""
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        raise RegistrationError(
            f"refusing to register: training run {run_id} is {run.info.status}, not FINISHED; rerun training."
        )
    bad = sorted(k for k, v in run.data.metrics.items() if not math.isfinite(v))
    if bad:
        raise RegistrationError(
            f"refusing to register: training run {run_id} has non-finite metrics ({', '.join(bad)})."
        )


def lock_path(cfg: Config, uri: str) -> Path:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///") + ".registry.lock")
    return Path(cfg.registry.lock_file)


def register_model(
    cfg: Config,
    model_path: str | Path,
    metrics_path: str | Path,
    grids_dir: str | Path,
    run_id: str | None = None,
) -> Registration:
    """Log, register and gate one trained model; see the module docstring.

    model_path: the train stage's model.pt; metrics_path: the evaluate stage's metrics.json
    (it must hold `cfg.eval.objective`); grids_dir: the folder of its PNG grids, all attached;
    run_id: the training run to log the model on (it must be FINISHED), or None for a new run.
    `cfg` supplies the registry, eval, data and mlflow sections, as the evaluate stage used them.
    """
    from dfcvae import tracking

    model_path, metrics_path, grids_dir = Path(model_path), Path(metrics_path), Path(grids_dir)
    objective = cfg.eval.objective
    metrics = read_metrics(metrics_path, objective)
    grids = sorted(grids_dir.glob("*.png"))
    if not grids:
        raise FileNotFoundError(f"no PNG grids in {grids_dir}: run the evaluate stage first.")
    state = load_checkpoint(model_path)
    if not all_finite(state["model"]):
        raise RegistrationError(f"refusing to register: {model_path} has non-finite weights.")

    manifest_hash = data_manifest_hash(cfg)
    uri = tracking.setup(cfg.mlflow)
    client = MlflowClient(tracking_uri=uri)
    new_run = run_id is None
    if run_id is None:
        train_cfg = Config.from_stored(state["config"])
        run_id = tracking.start_run(train_cfg, "register", tracking.run_tags(train_cfg, None, manifest_hash))
    else:
        check_run(client, run_id)

    tags = {
        "objective": objective,
        "objective_value": repr(float(metrics[objective])),
        "eval_key": evaluation_key(cfg, manifest_hash),
        "data.manifest_hash": manifest_hash,
        "git_commit": tracking.git_commit(),
        "weights_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "step": str(state.get("step", "unknown")),
        "min_active_fraction": repr(cfg.registry.min_active_fraction),
    }
    if isinstance(metrics.get(ACTIVE_FRACTION), (int, float)):
        tags["active_fraction"] = repr(float(metrics[ACTIVE_FRACTION]))
    try:
        sampler = grids_dir / SAMPLER_FILE
        model_uri = log_model(
            state, model_path, metrics_path, grids, run_id, sampler if sampler.is_file() else None, cfg.serve
        )
        with tracking.exclusive_lock(lock_path(cfg, uri), cfg.registry.lock_timeout_s):
            result = register_if_better(
                client,
                cfg.registry.model_name,
                model_uri,
                run_id,
                tags,
                reevaluate=functools.partial(objective_on, cfg),
            )
    except BaseException:
        if new_run:
            client.set_terminated(run_id, "FAILED")
        raise
    if new_run:
        client.set_terminated(run_id, "FINISHED")
    return result


def objective_on(cfg: Config, uri: str) -> float:
    """A registered model's eval.objective on cfg's evaluation (its test data and settings),
    the full evaluation run into a temporary folder."""
    from dfcvae.evaluate import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(uri, device)
    with tempfile.TemporaryDirectory() as tmp:
        numbers = evaluate(model, cfg.with_overrides({"eval.out_dir": tmp}), device)
    return float(numbers[f"test/{cfg.eval.objective}"])


def register_if_better(
    client: MlflowClient,
    name: str,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    reevaluate: Callable[[str], float] | None = None,
) -> Registration:
    """Create the version, set `challenger`, and move `champion` if it wins. Call under the lock.

    reevaluate: models:/ URI -> the objective on this registration's evaluation. When the
    champion was evaluated differently (other data: new images change the manifest hash; other
    eval settings), it is evaluated again like the challenger and compared on that number, so
    the champion can move as the data grows. Without it, such a champion stays.
    """
    version = int(mlflow.register_model(model_uri, name, tags=tags).version)
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    champion = current_champion(client, name)
    value = float(tags["objective_value"])
    note = ""
    if champion is not None and reevaluate is not None and champion.tags.get("eval_key") != tags["eval_key"]:
        before = champion.tags.get("objective_value", "none")
        again = reevaluate(f"models:/{name}/{champion.version}")
        champion = SimpleNamespace(
            version=champion.version,
            tags={
                **champion.tags,
                "objective": tags["objective"],
                "eval_key": tags["eval_key"],
                "objective_value": repr(again),
            },
        )
        note = (
            f" (champion v{champion.version} evaluated again like v{version}: {tags['objective']} {again!r}; "
            f"{before} on its own evaluation)"
        )
        client.set_model_version_tag(name, str(version), "champion_reevaluated", repr(again))
    decision, reason, champion_value = decide(champion, tags, version)
    reason = reason.removesuffix(".") + note + "." if note else reason
    if decision == "promoted":
        client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "decision", decision)
    client.update_model_version(name, str(version), description=reason)
    return Registration(
        model_name=name,
        version=version,
        decision=decision,
        reason=reason,
        objective=tags["objective"],
        challenger_objective=value,
        champion_objective=champion_value,
        previous_champion_version=int(champion.version) if champion else None,
        champion_version=version if decision == "promoted" else (int(champion.version) if champion else None),
        run_id=run_id,
    )


def current_champion(client: MlflowClient, name: str):
    """The champion's ModelVersion, or None; read via the model's alias map, as stores differ
    in the error they raise for a missing alias."""
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    return client.get_model_version(name, str(version)) if version is not None else None


def decide(champion, tags: dict[str, str], version: int) -> tuple[str, str, float | None]:
    """-> (decision, the description sentence, the champion's objective or None).

    A version whose posterior collapsed (active latent fraction under registry.min_active_fraction,
    or not measured) is never promoted, whatever its objective: its reconstructions ignore the input.
    """
    name, value = tags["objective"], float(tags["objective_value"])
    champion_value = (
        float(champion.tags["objective_value"]) if champion and "objective_value" in champion.tags else None
    )
    stays = f"champion stays v{champion.version}" if champion else "no champion yet"
    floor = float(tags["min_active_fraction"])
    if "active_fraction" not in tags:
        return (
            "kept",
            (
                f"kept: v{version}'s evaluation has no {ACTIVE_FRACTION}, so posterior collapse cannot be ruled out; "
                f"re-run the evaluate stage; {stays}."
            ),
            champion_value,
        )
    active = float(tags["active_fraction"])
    if active < floor:
        return (
            "kept",
            (
                f"kept: posterior collapse: only {active:.1%} of v{version}'s latent dimensions are active "
                f"(registry.min_active_fraction {floor:.1%}); lower loss.kl_weight and retrain; {stays}."
            ),
            champion_value,
        )
    if champion is None:
        return "promoted", f"promoted: no champion yet; {name} {value!r}; champion -> v{version}.", None
    theirs = champion.tags
    if theirs.get("objective") != name or theirs.get("eval_key") != tags["eval_key"] or "objective_value" not in theirs:
        # Numbers from different evaluations (or a hand-set champion) say nothing about which is better.
        reason = (
            f"kept: champion v{champion.version} was not evaluated like v{version} "
            f"(objective {theirs.get('objective')!r} vs {name!r}, eval key {theirs.get('eval_key')!r} vs "
            f"{tags['eval_key']!r}); {name} {value!r} is not compared; champion stays v{champion.version}."
        )
        champion_value = float(theirs["objective_value"]) if "objective_value" in theirs else None
        return "kept", reason, champion_value
    champion_value = float(theirs["objective_value"])
    if value < champion_value:
        return (
            "promoted",
            (
                f"promoted: {name} {value!r} beats champion v{champion.version}'s {champion_value!r} "
                f"(lower is better); champion -> v{version}."
            ),
            champion_value,
        )
    return (
        "kept",
        (
            f"kept: {name} {value!r} does not beat champion v{champion.version}'s {champion_value!r} "
            f"(lower is better); champion stays v{champion.version}."
        ),
        champion_value,
    )
