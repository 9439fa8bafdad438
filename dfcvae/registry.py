"""The MLflow model registry: the served model, registration, and the gated champion.

The one module that talks to the registry.

**The served model.** `VAEModel` is an `mlflow.pyfunc.PythonModel`; the logged model ships
the `dfcvae` package as code and the train stage's plain-data checkpoint as an artifact,
so `mlflow.pyfunc.load_model("models:/<name>@champion")` works wherever torch and mlflow
are installed. Loading builds only `DFCVAE`, from the `model.py` bundled with that version
(`bundled_model_class`: two versions loaded in one process each run their own network code):
no perceptual network, no VGG or ImageNet weights. A PythonModel, not MLflow 3's torch.export flavour, whose
exported graph would fix the batch size to the input example's.

`predict(model_input, params)`:
  - `model_input`: a float32 array (B, 3, H, W) in [-1, 1], any B (the signature's batch
    dimension is -1). Over REST: `{"inputs": <nested list>, "params": {...}}`.
  - `params["mode"]`:
      - "reconstruct" (default): reconstructions through the latent mean, (B, 3, H, W) in [-1, 1];
      - "encode": the latent means, (B, latent_dim);
      - "sample": `params["n"]` (default 16) prior samples, (n, 3, H, W), from `params["seed"]`
        (default 0); the input is validated but otherwise ignored.
The signature's output schema describes the default mode.

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
import importlib.util
import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from dfcvae.checkpoint import REGISTERED_ARTIFACT, all_finite, load_checkpoint, load_model
from dfcvae.config import Config, UserError
from dfcvae.model import DFCVAE

# This module is imported wherever the pyfunc is loaded (a serving container): the training
# stack (dfcvae.train, dfcvae.data, the perceptual network) is imported inside the functions
# that register, never at module level.

CHAMPION = "champion"
CHALLENGER = "challenger"
PREDICT_PARAMS = {"mode": "reconstruct", "n": 16, "seed": 0}
MODES = ("reconstruct", "encode", "sample")
BUNDLED_PACKAGE = Path(__file__).resolve().parent  # the dfcvae package, shipped with every registered model
INPUT_SLACK = 1e-3  # rounding in a client's scaling to [-1, 1]
ACTIVE_FRACTION = "test/active_fraction"  # the evaluation's share of active latent units
# Eval settings that do not change the objective's value, left out of the evaluation key.
EVAL_KEY_IGNORES = ("batch_size", "out_dir", "probe_attributes", "arithmetic_attributes", "probe_train_samples")


class RegistrationError(UserError, ValueError):
    """Registration refused: the run, its metrics or its weights are not fit to serve."""


# ---------------------------------------------------------------- the served model


class VAEModel(mlflow.pyfunc.PythonModel):
    """DFC-VAE behind MLflow's pyfunc interface; see the module docstring for `predict`."""

    def load_context(self, context) -> None:
        checkpoint = Path(context.artifacts[REGISTERED_ARTIFACT])
        state = load_checkpoint(checkpoint)
        cfg = Config.from_dict(state["config"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = bundled_model_class(checkpoint.parent.parent)(cfg.model, cfg.data.image_size)
        self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()

    # np.ndarray is a hint MLflow accepts without inferring a schema from it: the signature rules.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        params = {**PREDICT_PARAMS, **(params or {})}
        mode = params["mode"]
        if mode not in MODES:
            raise bad_input(f"params.mode {mode!r} is not one of {MODES}.")
        if mode == "sample":
            generator = torch.Generator().manual_seed(int(params["seed"]))
            return self.model.sample(int(params["n"]), generator).float().cpu().numpy()
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=self.device)  # (B, 3, H, W)
        size = self.model.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise bad_input(f"expected images of shape (B, 3, {size}, {size}) in [-1, 1], got {tuple(x.shape)}.")
        if not torch.isfinite(x).all():
            raise bad_input("the images hold NaN or infinite values: send finite pixels in [-1, 1].")
        low, high = float(x.min()), float(x.max())
        if low < -1 - INPUT_SLACK or high > 1 + INPUT_SLACK:
            hint = " (8-bit pixels? send x / 127.5 - 1)" if high > 2 else " (send 2 x - 1 for [0, 1] pixels)"
            raise bad_input(f"the images range over [{low:.3g}, {high:.3g}], not [-1, 1]{hint}.")
        with torch.no_grad():
            out = self.model.encode(x)[0] if mode == "encode" else self.model.reconstruct(x)
        return out.float().cpu().numpy()


def bundled_model_class(model_dir: Path) -> type[DFCVAE]:
    """DFCVAE as the code this model was registered with defines it (<model_dir>/code/dfcvae/model.py),
    loaded under a module name of its own. Python imports `dfcvae` once per process, so without
    this two versions loaded side by side would both run whichever version's package came first.
    The importable dfcvae.model when the files bundle no code."""
    source = model_dir / "code" / "dfcvae" / "model.py"
    if not source.is_file():
        return DFCVAE
    name = f"_dfcvae_registered_{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].DFCVAE


def bad_input(message: str) -> MlflowException:
    """A caller's mistake: MLflow's server answers 400 with this message (any other exception
    becomes its generic "unexpected error")."""
    return MlflowException.invalid_parameter_value(message)


def model_signature(example: np.ndarray) -> ModelSignature:
    """Images in, images out (the default mode), any batch size, with the predict params."""
    image = TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), name=None)
    params = ParamSchema(
        [
            ParamSpec("mode", "string", PREDICT_PARAMS["mode"]),
            ParamSpec("n", "long", PREDICT_PARAMS["n"]),
            ParamSpec("seed", "long", PREDICT_PARAMS["seed"]),
        ]
    )
    return ModelSignature(inputs=Schema([image]), outputs=Schema([image]), params=params)


def input_example(state: dict, n: int = 2) -> np.ndarray:
    """Seeded prior samples from the model itself: realistic, deterministic images."""
    cfg = Config.from_dict(state["config"])
    model = DFCVAE(cfg.model, cfg.data.image_size)
    model.load_state_dict(state["model"])
    return model.eval().sample(n, torch.Generator().manual_seed(0)).numpy()  # (n, 3, H, W)


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
        train_cfg = Config.from_dict(state["config"])
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
        model_uri = log_model(state, model_path, metrics_path, grids, run_id)
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


def log_model(state: dict, model_path: Path, metrics_path: Path, grids: list[Path], run_id: str) -> str:
    """Log the pyfunc model on `run_id` with its attachments; returns its models:/ URI."""
    example = input_example(state)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(state["config"], indent=2, sort_keys=True) + "\n")
        # Attachments ride along as pyfunc artifacts: whoever downloads the version gets them.
        artifacts = {
            REGISTERED_ARTIFACT: str(model_path),
            "config": str(config_path),
            "metrics": str(metrics_path),
            **{f"grid_{grid.stem}": str(grid) for grid in grids},
        }
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=VAEModel(),
            artifacts=artifacts,
            code_paths=[str(BUNDLED_PACKAGE)],
            signature=model_signature(example),
            input_example=(example, PREDICT_PARAMS),
            pip_requirements=_requirements(),
            step=int(state.get("step", 0)),
        )
    return info.model_uri


def _requirements() -> list[str]:
    import yaml

    # Local version labels (+cu130) are not on PyPI; the serving image picks its own build.
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pyyaml=={yaml.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


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
