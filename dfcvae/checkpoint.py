"""Checkpoints: save, load and resolve VAE weights together with the config they were trained with.

A checkpoint is plain data, `{"model": state_dict, "config": Config.to_dict(), "step": int, ...}`
(training checkpoints add the optimiser, scheduler and EMA state), so it loads with
`torch.load(weights_only=True)` and never runs pickled code. One function turns any source into
a model: `load_model` takes the train stage's model.pt, a checkpoint file or folder, or a
registered model `models:/<name>@<alias>` (whose files bundle the same checkpoint as the pyfunc
artifact REGISTERED_ARTIFACT), and builds the architecture from the stored config, as DiT's
`find_model` and nanoGPT's checkpoints do, never from the weights' shapes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfcvae.config import Config, ConfigError, UserError
from dfcvae.model import DFCVAE

CHECKPOINT_FILE = "checkpoint.pt"  # in a training checkpoint's folder
MODEL_FILE = "model.pt"  # the train stage's output
REGISTERED_ARTIFACT = "checkpoint"  # the pyfunc artifact holding a registered model's checkpoint


def all_finite(state: dict[str, Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def state_digest(state: dict[str, Tensor]) -> str:
    """sha256 over a state_dict's names and bytes: equal digests, bit-identical tensors."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DamagedCheckpointError(UserError, ValueError):
    """A checkpoint whose bytes are not what was written: truncated, or its content digest differs."""


DIGEST_KEY = "payload_sha256"  # in every checkpoint written since it existed: payload_digest of the rest


def payload_digest(payload: Any) -> str:
    """sha256 over a checkpoint's contents: every tensor's bytes and every other value, by key path."""
    digest = hashlib.sha256()

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                if key != DIGEST_KEY:
                    walk(value[key], f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}/{i}")
        elif isinstance(value, Tensor):
            digest.update(f"{where}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{where}={value!r}".encode())

    walk(payload, "")
    return digest.hexdigest()


def save_checkpoint(payload: dict, directory: Path) -> Path:
    """Write directory/CHECKPOINT_FILE atomically (a crash mid-write leaves no half file under the
    final name), with the digest of its contents, which load_checkpoint checks."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    payload = {**payload, DIGEST_KEY: payload_digest(payload)}
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, target)
    return target


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or a folder holding CHECKPOINT_FILE. Raises FileNotFoundError when absent,
    ValueError for anything that is not plain data (pickled code is never run), and
    DamagedCheckpointError for a file cut short or whose contents differ from their digest (a
    checkpoint written before the digest existed is read without it)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint directory or {CHECKPOINT_FILE}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it is not a plain-data checkpoint ({type(err).__name__}); "
            "only files written by dfcvae load."
        ) from err
    except Exception as err:  # a zip cut short or overwritten: torch's reader fails on its structure
        raise DamagedCheckpointError(f"checkpoint {path} is damaged (cut short or overwritten: {err}).") from None
    stored = payload.pop(DIGEST_KEY, None) if isinstance(payload, dict) else None
    if stored is not None and stored != payload_digest(payload):
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: its contents differ from their digest.")
    return payload


class RegistryError(UserError, LookupError):
    """A models:/ URI that names no version in the store: the sentence says which versions exist."""


def resolve_registered(uri: str):
    """models:/<name>@<alias> or models:/<name>/<version> -> its MLflow ModelVersion, from the store
    MLflow is pointed at (tracking.use_store). Raises RegistryError, one sentence naming what is
    missing and the versions and aliases that exist (an alias whose version was deleted,
    mlflow/mlflow#8459, a wrong name), and ConfigError for a URI of another form."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    name, alias = ref.split("@", 1) if "@" in ref else (ref.partition("/")[0], "")
    number = "" if alias else ref.partition("/")[2]
    if not name or not (alias or number.isdigit()):
        raise ConfigError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>.")
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    missing = f"the alias {alias!r} is not set" if alias else f"there is no version {number}"
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    if not versions:
        raise RegistryError(
            f"{uri}: the store {client.tracking_uri} has no registered model {name!r}: run the pipeline "
            "(dvc repro) to register one, or point MLFLOW_TRACKING_URI at the store that holds it."
        )
    aliases = {}
    for alias_name, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias_name)
    listed = ", ".join(
        f"{v.version}" + (f" ({', '.join(sorted(aliases[str(v.version)]))})" if str(v.version) in aliases else "")
        for v in versions
    )
    raise RegistryError(
        f"{uri}: {missing} on {name!r} (its version may have been deleted); the versions that exist are "
        f"{listed}: name one as models:/{name}/<version>, or register a model again."
    )


def download_registered(uri: str, dst: str | Path) -> dict[str, Path]:
    """A registered model's files, e.g. `models:/dfcvae@champion`, downloaded under `dst`:
    pyfunc artifact name -> local path (REGISTERED_ARTIFACT, "metrics", "grid_<name>", "sampler").
    RegistryError when the URI names no version (resolve_registered), ValueError when it is not
    a dfcvae model."""
    import mlflow
    from mlflow.models import Model

    version = resolve_registered(uri)
    exact = f"models:/{version.name}/{version.version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=exact, dst_path=str(dst)))
    artifacts = Model.load(local).flavors.get("python_function", {}).get("artifacts", {})
    if REGISTERED_ARTIFACT not in artifacts:
        raise ValueError(f"{uri} is not a dfcvae model: it has no '{REGISTERED_ARTIFACT}' artifact.")
    return {name: local / entry["path"] for name, entry in artifacts.items()}


def load_registered(uri: str) -> dict[str, Any]:
    """The checkpoint a registered model bundles, e.g. `models:/dfcvae@champion` (MLflow download)."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(download_registered(uri, tmp)[REGISTERED_ARTIFACT])


# The keys that decide a model's weights and what they compute. nearest and bilinear decoders
# have the same weights, so only the stored config tells them apart.
ARCHITECTURE_KEYS = (
    "data.image_size",
    "model.hidden_channels",
    "model.latent_dim",
    "model.upsample",
    "model.encoder_kernel",
    "model.full_res_convs",
)


def check_source(source: str) -> None:
    """That `source` (as load_state takes it) is there, before work starts that would need it:
    RegistryError or FileNotFoundError, one sentence each."""
    if source.startswith("models:/"):
        resolve_registered(source)
        return
    path = Path(source)
    if not (path.is_file() or (path / MODEL_FILE).is_file() or (path / CHECKPOINT_FILE).is_file()):
        raise FileNotFoundError(f"{source} is not a model.pt, a checkpoint, or a folder holding one.")


def init_from_state(source: str) -> dict[str, Any]:
    """train.init_from's state. A training checkpoint (file or folder; a folder's CHECKPOINT_FILE
    before its MODEL_FILE) resumes: all it holds, its step and optimizer included. A model as
    published (model.pt, a folder holding it, or a `models:/` URI) has no optimizer state: its
    weights start a new run at step 0, where its own step would have made a run of train.steps or
    fewer train nothing. Raises RegistryError, FileNotFoundError, or as load_checkpoint does."""
    if source.startswith("models:/"):
        state = load_registered(source)
    else:
        check_source(source)
        path = Path(source)
        if path.is_dir() and not (path / CHECKPOINT_FILE).is_file():
            path = path / MODEL_FILE
        state = load_checkpoint(path)
    if "optimizer" in state:
        return state
    return {"model": state["model"], "config": state["config"], "step": 0}


def pin_init_from(cfg: Config) -> str:
    """train.init_from checked, as every worker and retry must read it: a `models:/` alias as the
    version it names now (`models:/<name>/<version>`), so none loads a version moved there since;
    a local path made absolute (workers do not share the driver's cwd). Raises ConfigError, in one
    sentence, when the source holds a model built otherwise than cfg builds one (ARCHITECTURE_KEYS:
    its weights would load into another decoder, or fail on their shapes in every worker), or a
    training checkpoint already at train.steps; else as init_from_state does."""
    source = cfg.train.init_from
    if source.startswith("models:/"):
        version = resolve_registered(source)
        source = f"models:/{version.name}/{version.version}"
    elif "://" not in source:
        source = str(Path(source).resolve())
    state = init_from_state(source)
    stored = Config.from_stored(state["config"], source=source).flat()
    ours = cfg.flat()
    differ = [f"{key} {stored[key]} (this run: {ours[key]})" for key in ARCHITECTURE_KEYS if stored[key] != ours[key]]
    if differ:
        raise ConfigError(
            f"train.init_from {cfg.train.init_from} holds a model built with {', '.join(differ)}: set these keys "
            "to its values to fine-tune it, or clear train.init_from to train this architecture from scratch."
        )
    if state["step"] >= cfg.train.steps:
        raise ConfigError(
            f"train.init_from {cfg.train.init_from} is a training checkpoint at step {state['step']}, and "
            f"train.steps is {cfg.train.steps}: raise train.steps to train on, or give its model.pt to start "
            "a new run from its weights."
        )
    return source


def load_state(source: str | Path) -> dict[str, Any]:
    """Any source -> its model as `published` gives it: a `models:/` URI, model.pt, a checkpoint
    file, or a folder holding model.pt or CHECKPOINT_FILE."""
    source = str(source)
    if source.startswith("models:/"):
        return load_registered(source)
    path = Path(source)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE
    return published(load_checkpoint(path))


def published(state: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint -> {"model", "config", "step"}: the weights that are evaluated,
    registered, served and exported. With train.ema_decay on, those are the EMA's ("ema"), as
    validation during training scores them; the optimizer's and the raw weights stay behind."""
    return {"model": state.get("ema", state["model"]), "config": state["config"], "step": state.get("step")}


def model_from_state(
    state: dict, device: torch.device | str, model_class: type[DFCVAE] = DFCVAE
) -> tuple[DFCVAE, Config]:
    """{"model": state_dict, "config": dict, ...} -> (the VAE in eval mode on device, its Config):
    the one way every stored model (model.pt, a registered version, a bundle) is built.
    A config stored before an architecture field existed loads as the architecture of such models
    (`Config.from_stored`, STORED_BEFORE_FIELD). model_class: the class to build, e.g. the one in
    the code a registered version carries."""
    cfg = Config.from_stored(state["config"])
    model = model_class(cfg.model, cfg.data.image_size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def load_model(source: str | Path, device: torch.device | str) -> tuple[DFCVAE, Config]:
    """A trained VAE in eval mode on `device` and the config it was trained with, from any source
    `load_state` takes."""
    return model_from_state(load_state(source), device)
