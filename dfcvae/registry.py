"""The MLflow model registry: registration and the gated champion.

The one module that talks to the registry.

The served model itself (`VAEModel`, its signature, how it is logged) is dfcvae/served.py.

**Registration.** `register_model` refuses a failed or unfinished training run, non-finite
metrics or weights, then logs the model on the training run, registers it under
`registry.model_name`, and attaches the evaluation grids, metrics.json, the per-image scores
(scores.npz) and the training config (model artifacts), plus the data manifest hash, FID
protocol, git commit and objective (version tags). Every new version gets alias `challenger`.

**The champion gate.** `champion` moves to the new version only on evidence:
- The two are scored on the same evaluation: the same test images, sample seeds, Inception
  network and settings (`evaluation_key`). A champion scored otherwise (the data grew, the eval
  settings changed, it predates scores.npz) is evaluated again like the challenger first.
- Its objective (`eval.objective`, FIDs, lower is better) is compared image by image: a paired
  bootstrap over the same test images and samples (dfcvae/uncertainty.py). The challenger is
  promoted only when its objective is lower by at least `registry.min_improvement` (a fraction of
  the champion's) at `registry.min_confidence`: the one-sided bound of the relative difference
  lies below -min_improvement. Two trainings of one recipe differ by seed noise, and are kept.
- A model whose posterior collapsed (active latent fraction under registry.min_active_fraction)
  is never promoted.
The decision, both values, the difference with its interval and the per-image metrics' paired
differences go into the version's description and tags and the returned `Registration`.

**Concurrency.** MLflow has no compare-and-set for aliases, so the version creation, the check
that the champion is still the one scored, and the alias moves run under one exclusive file lock
(filelock), held for seconds: logging the model and scoring the champion again, the slow parts,
run before it. If the champion moved meanwhile, the lock is released and the new champion scored.
With a SQLite store the lock file sits beside the database, so every process sharing that store
shares the lock; with a tracking server it is `registry.lock_file`, which must be on a
filesystem shared by all registering machines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dfcvae import tracking
from dfcvae.checkpoint import all_finite, download_registered, load_checkpoint, load_model
from dfcvae.config import Config, RegistryConfig, UserError
from dfcvae.device import default_device
from dfcvae.sampler import SAMPLER_FILE
from dfcvae.served import VAEModel, log_model  # noqa: F401 (VAEModel: older registered models name it here)
from dfcvae.uncertainty import SCORES_FILE, Difference, Scores, ScoresError, paired_means, paired_objective

CHAMPION = "champion"
CHALLENGER = "challenger"
ACTIVE_FRACTION = "test/active_fraction"  # the evaluation's share of active latent units
# Eval settings that do not change the objective's value, left out of the evaluation key.
# (probe_train_samples counts: the Gaussian mixture sampler is fit on that many train latents.)
EVAL_KEY_IGNORES = (
    "batch_size",
    "fid_protocol",  # adds the literature FIDs; the objective's FIDs stay the same
    "out_dir",
    "probe_attributes",
    "arithmetic_attributes",
    "lpips_net",
    "lpips_weights",
    "confidence",
    "bootstrap_resamples",
    "kid_subsets",
    "kid_subset_size",
)
SCORES_ARTIFACT = "scores"  # the pyfunc artifact holding the evaluation's scores.npz


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
    challenger_objective: float  # this version's, from its scores
    champion_objective: float | None  # the champion's on the same evaluation; None: no champion
    previous_champion_version: int | None
    champion_version: int | None  # after this registration; None: still no champion
    run_id: str
    # (challenger - champion) / champion and its bounds, each one-sided at min_confidence; None: no champion
    difference: float | None = None
    difference_interval: list[float] | None = None
    min_confidence: float | None = None
    min_improvement: float | None = None
    champion_scored_again: bool = False  # the champion was evaluated again like the challenger
    per_image: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # paired mean differences
    fid_protocol: dict[str, Any] | None = None
    lock_held_s: float = 0.0  # how long this registration held the registry lock


def evaluation_key(cfg: Config, manifest_hash: str, inception: str = "unknown") -> str:
    """Identifies an evaluation: objectives with different keys are not comparable. `inception`:
    the FID network's identity (its file hash)."""
    settings = {k: v for k, v in cfg.to_dict()["eval"].items() if k not in EVAL_KEY_IGNORES}
    settings |= {"image_size": cfg.data.image_size, "manifest_hash": manifest_hash, "inception": inception}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def data_manifest_hash(cfg: Config) -> str:
    """The shard set's manifest hash; "unknown" only when there is no manifest at all."""
    from dfcvae.shards.format import DataError, manifest_hash

    try:
        return manifest_hash(cfg)
    except DataError as err:
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
    (it must hold `cfg.eval.objective`); grids_dir: the evaluate stage's folder: its PNG grids,
    all attached, and scores.npz, which the gate compares; run_id: the training run to log the
    model on (it must be FINISHED), or None for a new run. `cfg` supplies the registry, eval, data
    and mlflow sections, as the evaluate stage used them. Raises RegistrationError (refused),
    FileNotFoundError (a missing evaluation output), TimeoutError (the lock stayed held).
    """
    model_path, metrics_path, grids_dir = Path(model_path), Path(metrics_path), Path(grids_dir)
    objective = cfg.eval.objective
    metrics = read_metrics(metrics_path, objective)
    grids = sorted(grids_dir.glob("*.png"))
    if not grids:
        raise FileNotFoundError(f"no PNG grids in {grids_dir}: run the evaluate stage first.")
    scores_path = grids_dir / SCORES_FILE
    if not scores_path.is_file():
        raise FileNotFoundError(
            f"{scores_path} not found: re-run the evaluate stage (it writes the per-image scores the champion "
            "gate compares)."
        )
    challenger = Scores.load(scores_path)
    state = load_checkpoint(model_path)
    if not all_finite(state["model"]):
        raise RegistrationError(f"refusing to register: {model_path} has non-finite weights.")

    manifest_hash = data_manifest_hash(cfg)
    protocol = metrics.get("fid_protocol") if isinstance(metrics.get("fid_protocol"), dict) else None
    inception = str((protocol or {}).get("inception", "unknown"))
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
        "eval_key": evaluation_key(cfg, manifest_hash, inception),
        "data.manifest_hash": manifest_hash,
        "fid_inception": inception,
        "fid_protocol": json.dumps(protocol, sort_keys=True) if protocol else "unknown",
        "git_commit": tracking.git_commit(),
        "weights_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "step": str(state.get("step", "unknown")),
        "min_active_fraction": repr(cfg.registry.min_active_fraction),
    }
    if isinstance(metrics.get(ACTIVE_FRACTION), (int, float)):
        tags["active_fraction"] = repr(float(metrics[ACTIVE_FRACTION]))
    try:
        sampler = grids_dir / SAMPLER_FILE
        logged = log_model(
            state,
            model_path,
            metrics_path,
            grids,
            run_id,
            sampler if sampler.is_file() else None,
            cfg.serve,
            {SCORES_ARTIFACT: scores_path},
        )
        link_evaluation(client, cfg, run_id, logged.model_id, metrics, int(state.get("step", 0)))
        result = register_if_better(
            client,
            cfg.registry,
            logged.model_uri,
            run_id,
            tags,
            challenger,
            lambda version: champion_scores(cfg, client, version, tags["eval_key"]),
            lock=lambda: tracking.exclusive_lock(lock_path(cfg, uri), cfg.registry.lock_timeout_s),
            bootstrap=(cfg.eval.bootstrap_resamples, cfg.eval.seed),
        )
    except BaseException:
        if new_run:
            client.set_terminated(run_id, "FAILED")
        raise
    if new_run:
        client.set_terminated(run_id, "FINISHED")
    return dataclasses.replace(result, fid_protocol=protocol)


def link_evaluation(
    client: MlflowClient, cfg: Config, run_id: str, model_id: str, metrics: dict[str, Any], step: int
) -> None:
    """MLflow 3 lineage: the evaluation's test metrics (metrics.json's numbers) logged again, linked
    to the logged model `model_id` and to the shards that scored them (`tracking.shards_dataset`,
    also an input of the run in context "evaluation"), so a registered version leads to the data
    that trained it (its run's "training" input) and to the data that scored it. Without a
    manifest the metrics are linked to the model alone."""
    dataset = tracking.shards_dataset(cfg)
    if dataset is not None:
        tracking.log_dataset(client, run_id, dataset, "evaluation")
    numbers = {k: float(v) for k, v in metrics.items() if k.startswith("test/") and isinstance(v, (int, float))}
    tracking.RunLogger(client.tracking_uri, run_id).metrics(numbers, step, model_id, dataset)


def scores_on(cfg: Config, uri: str) -> Scores:
    """A registered model's scores on cfg's evaluation (its test data and settings), as stored."""
    from dfcvae.evaluate import evaluate

    device = default_device()
    model, _ = load_model(uri, device)
    return evaluate(model, cfg, device).scores


def champion_scores(cfg: Config, client: MlflowClient, version, eval_key: str) -> tuple[Scores, str]:
    """-> (the champion's scores on this registration's evaluation, why they were scored again or "").

    Its own stored scores when it was evaluated like this registration (the same evaluation key);
    otherwise, or when it has none (registered before scores.npz), it is evaluated again (`scores_on`)."""
    name, number = version.name, version.version
    uri = f"models:/{name}/{number}"
    if version.tags.get("eval_key") != eval_key:
        why = f"evaluated on another evaluation (eval key {version.tags.get('eval_key')!r}, this one {eval_key!r})"
        return scores_on(cfg, uri), why
    with tempfile.TemporaryDirectory() as tmp:
        stored = download_registered(uri, tmp).get(SCORES_ARTIFACT)
        if stored is not None:
            try:
                return Scores.load(stored), ""
            except ScoresError as err:
                why = f"its stored scores are unreadable ({err})"
        else:
            why = "registered without per-image scores"
    return scores_on(cfg, uri), why


Evidence = Callable[[Any], tuple[Scores, str]]  # champion ModelVersion -> (its scores, why scored again or "")


def register_if_better(
    client: MlflowClient,
    gate: RegistryConfig,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    challenger: Scores,
    evidence: Evidence,
    lock: Callable[[], Any],
    bootstrap: tuple[int, int] = (200, 0),
) -> Registration:
    """Create the version, set `challenger`, and move `champion` if the evidence says so.

    The champion's scores come from `evidence` before the lock (`lock()`, a context manager) is
    taken; under it, the version is created (first pass), the champion read again, and if it is
    still the one scored, the decision made and the aliases moved. Otherwise the lock is let go
    and the new champion scored. bootstrap: (resamples, seed) of the paired comparison.
    """
    name = gate.model_name
    version: int | None = None
    held = 0.0
    while True:
        champion = current_champion(client, name)
        scored = _compare(champion, tags, challenger, evidence, gate, bootstrap)
        with lock():
            start = time.monotonic()
            if version is None:
                version = int(mlflow.register_model(model_uri, name, tags=tags).version)
                client.set_registered_model_alias(name, CHALLENGER, str(version))
            now = current_champion(client, name)
            if _number(now) != _number(champion):
                held += time.monotonic() - start
                continue  # promoted meanwhile: score that one, outside the lock
            difference, per_image, again = scored
            decision, reason = decide(champion, tags, version, difference, gate, again)
            if decision == "promoted":
                client.set_registered_model_alias(name, CHAMPION, str(version))
            record = {"decision": decision}
            if difference is not None:
                record |= {
                    "champion_compared": str(champion.version),
                    "objective_difference": repr(difference.relative),
                    "objective_difference_interval": json.dumps(difference.interval),
                    "champion_objective_value": repr(difference.champion),
                }
            for key, value in record.items():
                client.set_model_version_tag(name, str(version), key, value)
            client.update_model_version(name, str(version), description=reason)
            held += time.monotonic() - start
        break
    return Registration(
        model_name=name,
        version=version,
        decision=decision,
        reason=reason,
        objective=tags["objective"],
        challenger_objective=difference.challenger if difference else float(tags["objective_value"]),
        champion_objective=difference.champion if difference else None,
        previous_champion_version=_number(champion),
        champion_version=version if decision == "promoted" else _number(champion),
        run_id=run_id,
        difference=difference.relative if difference else None,
        difference_interval=difference.interval if difference else None,
        min_confidence=gate.min_confidence,
        min_improvement=gate.min_improvement,
        champion_scored_again=bool(again),
        per_image=[dataclasses.asdict(d) for d in per_image],
        lock_held_s=round(held, 3),
    )


def _number(version) -> int | None:
    return int(version.version) if version is not None else None


def _compare(champion, tags, challenger, evidence, gate, bootstrap) -> tuple[Difference | None, list[Difference], str]:
    """(objective difference, per-image metric differences, why the champion was scored again)."""
    if champion is None:
        return None, [], ""
    theirs, again = evidence(champion)
    difference = paired_objective(challenger, theirs, tags["objective"], gate.min_confidence, *bootstrap)
    return difference, paired_means(challenger, theirs, gate.min_confidence, *bootstrap), again


def current_champion(client: MlflowClient, name: str):
    """The champion's ModelVersion, or None (also before the model's first version); read via the
    model's alias map, as stores differ in the error they raise for a missing alias."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return client.get_model_version(name, str(version)) if version is not None else None


def decide(
    champion, tags: dict[str, str], version: int, difference: Difference | None, gate: RegistryConfig, again: str = ""
) -> tuple[str, str]:
    """-> (decision, the description sentence).

    A version whose posterior collapsed (active latent fraction under registry.min_active_fraction,
    or not measured) is never promoted, whatever its objective: its reconstructions ignore the input.
    Otherwise it is promoted when there is no champion, or when the upper bound of its objective's
    relative difference (one-sided at min_confidence) is below -min_improvement.
    """
    name = tags["objective"]
    stays = f"champion stays v{champion.version}" if champion else "no champion yet"
    floor = float(tags["min_active_fraction"])
    if "active_fraction" not in tags:
        return (
            "kept",
            f"kept: v{version}'s evaluation has no {ACTIVE_FRACTION}, so posterior collapse cannot be ruled out; "
            f"re-run the evaluate stage; {stays}.",
        )
    active = float(tags["active_fraction"])
    if active < floor:
        return (
            "kept",
            f"kept: posterior collapse: only {active:.1%} of v{version}'s latent dimensions are active "
            f"(registry.min_active_fraction {floor:.1%}); lower loss.kl_weight and retrain; {stays}.",
        )
    if champion is None or difference is None:
        return (
            "promoted",
            f"promoted: no champion yet; {name} {float(tags['objective_value']):.4g}; champion -> v{version}.",
        )
    low, high = difference.interval
    measured = (
        f"{name} {difference.challenger:.4g} vs champion v{champion.version}'s {difference.champion:.4g} "
        f"on the same images: {difference.relative:+.1%} (bounds {low:+.1%} to {high:+.1%}, each one-sided at "
        f"{gate.min_confidence:.0%})"
    )
    if again:
        measured += f"; the champion was evaluated again like v{version}: {again}"
    if high < -gate.min_improvement:
        return (
            "promoted",
            f"promoted: {measured}; lower by more than {gate.min_improvement:.0%}; champion -> v{version}.",
        )
    return (
        "kept",
        f"kept: {measured}; promotion needs {name} lower by more than {gate.min_improvement:.0%} at "
        f"{gate.min_confidence:.0%} confidence (registry.min_improvement, min_confidence); {stays}.",
    )
