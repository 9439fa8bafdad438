"""Ray: join the cluster in RAY_ADDRESS, or start one on this machine bound to 127.0.0.1."""

from __future__ import annotations

import os
import socket

from dfcvae.config import Config, UserError
from dfcvae.internals import loopback_only_ray, patient_dashboard_start


def init_ray() -> None:
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
    patient_dashboard_start()
    import ray

    try:
        context = ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
        )
    except BaseException:
        ray.shutdown()  # a start that failed halfway leaves its GCS and dashboard running otherwise
        raise
    return context.address_info["gcs_address"]


def local_storage(cfg: Config) -> bool:
    """scaling.storage_dir is one machine's disk: not a URI, not declared shared (storage_shared)."""
    return "://" not in cfg.scaling.storage_dir and not cfg.scaling.storage_shared


def local_storage_message(cfg: Config, where: str) -> str:
    return (
        f"scaling.storage_dir={cfg.scaling.storage_dir} is a local path on {where}: a checkpoint on one "
        "node's disk does not survive that node. Use object storage (s3://bucket/dfcvae/ray), or a path "
        "every node mounts with scaling.storage_shared: true."
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes() -> int:
    """Nodes alive in the cluster this process joined."""
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


def resources_summary() -> str:
    """The alive nodes' total resources, in words: "2 nodes: CPU 2, slot 1"."""
    import ray

    total = {k: v for k, v in ray.cluster_resources().items() if not k.startswith(("node:", "memory", "object_store"))}
    return f"{alive_nodes()} nodes: " + ", ".join(f"{k} {v:g}" for k, v in sorted(total.items()))


class StorageError(UserError, OSError):
    """scaling.storage_dir is object storage that does not answer, has no such bucket, or refuses writes."""


def check_remote_storage(uri: str) -> None:
    """For a URI scaling.storage_dir (s3://, gs://, ...): that the store answers, the bucket exists
    and a write succeeds, before Ray starts (Ray Train would find out in its controller after
    30-40 s, as a long traceback). Through pyarrow's file systems, as Ray Train reaches the
    storage; credentials and the endpoint come from the environment (AWS_ENDPOINT_URL, ...).
    Raises StorageError saying which of the three is wrong."""
    import uuid

    import pyarrow.fs as pafs

    where = f"scaling.storage_dir={uri}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:
        raise StorageError(f"{where}: not a storage URI pyarrow can open ({_first_line(err)}).") from None
    bucket = path.split("/")[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(
            f"{where}: the object store at {endpoint} does not answer ({_first_line(err)}): check the endpoint "
            "(AWS_ENDPOINT_URL) and that the store is up."
        ) from None
    if not found:
        raise StorageError(
            f"{where}: the bucket {bucket!r} does not exist at {endpoint}: create it, or fix the bucket's name."
        )
    probe = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:
        raise StorageError(
            f"{where}: the bucket {bucket!r} refuses writes ({_first_line(err)}): check the credentials "
            "(AWS_ACCESS_KEY_ID, ...) and the bucket's policy."
        ) from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
