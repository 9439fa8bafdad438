"""MLflow experiment tracking: where runs go, and logging from the rank-0 worker.

The tracking URI is `MLFLOW_TRACKING_URI`; without it, a local SQLite database
and artifact folder (git-ignored, paths from params.yaml). An unreachable
tracking server fails fast, before any training starts, with a message naming
the URI: a run that trains for hours without being tracked is worse than one
that does not start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from dfcvae.config import Config, ConfigError, MlflowConfig
from dfcvae.shards.format import DataError, manifest_json, shard_url

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

# MLflow stores at most 36 characters of a dataset's digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE).
DATASET_DIGEST_CHARS = 36

# Bounded retries: the client's default backoff can wait minutes on a dead server. Set when this
# project starts talking to MLflow (`setup`, `RunLogger`), not at import; a value the user set wins.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def bound_http_retries() -> None:
    """MLflow's HTTP client gives up after HTTP_LIMITS (its env variables, read per request)."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


def store_path(path: str) -> Path:
    """mlflow.local_db / local_artifacts as an absolute path. A relative one is relative to the
    DVC repository: `dvc exp run --temp` and queued experiments run the stages in a temporary
    copy that is deleted afterwards, and set DVC_ROOT to the user's repository, whose store is
    the one to track and register into. Without DVC, the working directory."""
    base = Path(os.environ.get("DVC_ROOT") or ".")
    return (base / path).resolve()


def tracking_uri(cfg: MlflowConfig) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{store_path(cfg.local_db)}"


def use_store(cfg: MlflowConfig) -> str:
    """Point MLflow at the project's store to read from it, as the stages find it (MLFLOW_TRACKING_URI,
    else mlflow.local_db); -> the URI. Creates nothing: ConfigError when the local store does not
    exist yet, ConnectionError when the server does not answer."""
    uri = tracking_uri(cfg)
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():
        raise ConfigError(
            f"no MLflow store at {db} (mlflow.local_db): run the pipeline first (make demo, or dvc repro) "
            "from the project's folder, or set MLFLOW_TRACKING_URI to the store that holds the model."
        )
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def ui_command(cfg: MlflowConfig, port: int = 5000) -> list[str]:
    """The MLflow UI over the local store, on 127.0.0.1 only: nothing else on the network sees it.

    One worker process: it serves one person, and starts in a quarter of the default four's time.
    """
    return [
        "mlflow",
        "ui",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{cfg.local_db}",
    ]


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except urllib.error.HTTPError:
        return  # the server answered (auth proxies may not expose /health)
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({err}); start it, fix MLFLOW_TRACKING_URI, "
            "or unset it to track into the local SQLite store."
        ) from err


SETUP_LOCK_TIMEOUT_S = 300.0


def setup(cfg: MlflowConfig) -> str:
    """Point MLflow at the tracking store, create the experiment, return the URI.

    A new SQLite store is created by whichever process opens it first, running MLflow's schema
    migrations; two at once collide ("table ... already exists"). Processes on one machine
    (tune trials, stages, several retrains) therefore open it under a lock beside the database.
    """
    bound_http_retries()
    uri = tracking_uri(cfg)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(db.with_name(db.name + ".setup.lock"), SETUP_LOCK_TIMEOUT_S):
            return _create_experiment(cfg, uri)
    return _create_experiment(cfg, uri)


def _create_experiment(cfg: MlflowConfig, uri: str) -> str:
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = (
            None
            if "://" in cfg.local_artifacts or not uri.startswith("sqlite")
            else store_path(cfg.local_artifacts).as_uri()
        )
        try:
            mlflow.create_experiment(cfg.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            pass  # created concurrently by another process
    mlflow.set_experiment(cfg.experiment)
    return uri


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """An inter-process lock (filelock's flock on POSIX: released by the kernel if the holder dies).
    TimeoutError, one sentence, when another holder keeps it past `timeout_s`."""
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path, timeout=timeout_s, is_singleton=False, thread_local=False)
    try:
        lock.acquire(poll_interval=0.05)
    except filelock.Timeout:
        raise TimeoutError(
            f"lock {path} still held after {timeout_s:.0f} s: another process (a registration, "
            "a store being created) is running or hung; wait for it, then run again."
        ) from None
    try:
        yield
    finally:
        lock.release()


def training_run(cfg: Config) -> tuple[str, str] | None:
    """(tracking URI, run id) of the run named in train.out_dir/run.json; None without that file."""
    run_file = Path(cfg.train.out_dir) / "run.json"
    if not run_file.is_file():
        return None
    run = json.loads(run_file.read_text())
    uri = tracking_uri(cfg.mlflow)
    if run["tracking_uri"] != uri:
        raise ConfigError(
            f"{run_file} names a run in {run['tracking_uri']}, but the tracking URI is now {uri}: "
            "set MLFLOW_TRACKING_URI to the store that training used."
        )
    return uri, run["run_id"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def code_digest() -> str:
    """sha256 over the dfcvae package's Python files, subpackages included (paths and bytes):
    the code a run executes."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_tags(cfg: Config, manifest: dict[str, Any] | None, manifest_hash: str | None) -> dict[str, str]:
    source = (manifest or {}).get("source", "unknown")
    return {
        "git_commit": git_commit(),
        "code_sha256": code_digest(),
        "data.source": source,
        "data.synthetic": str(source == "synthetic").lower(),
        "data.manifest_hash": manifest_hash or "unknown",
        "perceptual.backbone": cfg.perceptual.backbone,
        "perceptual.layers": ",".join(cfg.perceptual.layers),
        "perceptual.weights": cfg.perceptual.weights,
        "perceptual.random_weights": str(cfg.perceptual.weights == "random").lower(),
    }


def shards_dataset(cfg: Config) -> Dataset | None:
    """cfg's shard set as an MLflow dataset (MLflow 3 lineage), or None when it has no manifest.

    name "<source> shards"; digest: the manifest's sha256 (`shards.format.manifest_hash`), its
    first DATASET_DIGEST_CHARS hex digits, as MLflow keeps no more; source: {"uri": the manifest's
    URL}; profile: {"manifest_sha256": the whole hash, "splits": {split: image count}}. A manifest
    of any format version is described as it is: lineage records data, it does not judge it."""
    try:
        manifest, digest = manifest_json(cfg)  # one read of the manifest, also from s3://
    except DataError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return None
        raise
    url = shard_url(cfg, "manifest.json")
    scheme = url.split("://")[0] if "://" in url else "local"
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    counts = {k: v.get("count") for k, v in sorted(splits.items()) if isinstance(v, dict)}
    profile = {"manifest_sha256": digest, "splits": counts}
    return Dataset(
        name=f"{manifest.get('source', 'unknown')} shards",
        digest=digest[:DATASET_DIGEST_CHARS],
        source_type=scheme,
        source=json.dumps({"uri": url if "://" in url else str(Path(url).resolve())}),
        profile=json.dumps(profile),
    )


def start_run(
    cfg: Config, run_name: str, tags: dict[str, str], parent_run_id: str | None = None, data: str | None = None
) -> str:
    """Create a run with the flattened config as params and return its id. data: "training" or
    "evaluation": the run also logs cfg's shards (`shards_dataset`) as its input in that context."""
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment.experiment_id, run_name=run_name, tags=all_tags)
    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    if data and (dataset := shards_dataset(cfg)) is not None:
        log_dataset(client, run.info.run_id, dataset, data)
    return run.info.run_id


def log_dataset(client: MlflowClient, run_id: str, dataset: Dataset, context: str) -> None:
    """`dataset` as an input of the run, tagged with its context (MLflow's mlflow.data.context).
    MLflow keeps one input per dataset and run: the first context logged stays."""
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def system_metrics(uri: str, run_id: str, every_s: float, resume: bool) -> SystemMetricsMonitor:
    """MLflow's system-metrics sampler, started: CPU, memory, disk and network of this node (and
    its GPUs through nvidia-ml-py when there are some), logged to `run_id` as system/* every
    `every_s` seconds from a background thread; `resume`: continue the run's step count. Stop it
    with `.finish()`. Imported here: the monitor and nvidia-ml-py take 86 ms to import, which every
    process that imports this module would otherwise pay."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor


class RunLogger:
    """Logs to one existing run by id; used by the rank-0 worker and the stages."""

    def __init__(self, uri: str, run_id: str):
        bound_http_retries()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def metrics(
        self, values: dict[str, float], step: int, model_id: str | None = None, dataset: Dataset | None = None
    ) -> None:
        """Metrics at `step`; linked (MLflow 3) to the logged model `model_id` and to the
        `dataset` that scored them when given."""
        now = int(time.time() * 1000)
        link = {"model_id": model_id}
        if dataset is not None:
            link |= {"dataset_name": dataset.name, "dataset_digest": dataset.digest}
        batch = [Metric(k, float(v), now, step, **link) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def status(self, status: str) -> None:
        """Set the run's status (RUNNING again for a run being continued) without ending it."""
        self.client.update_run(self.run_id, status=status)

    def run(self) -> mlflow.entities.Run:
        """The run as MLflow has it now: params, metrics, tags."""
        return self.client.get_run(self.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
