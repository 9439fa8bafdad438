"""Every use of a library's private API, in one place, each with its reason and its fallback.

A private API may change or vanish in any release. Each function here tries it, and when it is
missing falls back to public behaviour that is correct but slower or weaker, saying so once in
the log. tests/test_internals.py drives every fallback.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

PROC_MAPS = "/proc/self/maps"  # the libraries mapped into this process (Linux)
SINGLE_MACHINE_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray binds 127.0.0.1 only


def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    """`nbytes` of shared memory as a torch storage, which pickles as a handle (fork, spawn and
    forkserver alike). Used by dfcvae.shards.slots for the loader's batch slots.

    Private: `torch.UntypedStorage._new_shared` allocates straight in shared memory.
    Fallback: a tensor allocated in ordinary memory, then moved by the public `share_memory_()`,
    which briefly holds the slots twice (once, at loader start).
    """
    try:
        return torch.UntypedStorage._new_shared(nbytes)
    except (AttributeError, TypeError) as err:
        log.warning("torch.UntypedStorage._new_shared unavailable (%s): allocating, then sharing", err)
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()


def lost_worker(failure: BaseException) -> bool:
    """A failure that says a process of the run was lost: a training worker or its node
    (lost_worker_errors), or one of its DataLoader processes, which the kernel's OOM killer picks
    first. torch says the last only in words: RuntimeError "DataLoader worker (pid(s) ...) exited
    unexpectedly"."""
    if isinstance(failure, lost_worker_errors()):
        return True
    text = str(failure)
    return isinstance(failure, RuntimeError) and "DataLoader worker" in text and "exited unexpectedly" in text


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """The exception types that say a training worker or its node was lost (killed, out of memory,
    a node down or cut off): what a retry from the latest checkpoint can fix, and nothing else.
    Used by dfcvae.train.fit, which retries only these.

    Private: Ray Train V2 reports a worker whose process died through its health check,
    `ray.train.v2._internal.exceptions.WorkerHealthCheckFailedError` (and its timeout twin).
    Public: Ray's RayActorError family, and torch.distributed's DistError, which a surviving
    rank raises when its peer vanishes mid-collective.
    Fallback: the public types only; a lost worker then shows through its peers' DistError.
    """
    import ray.exceptions
    import torch.distributed

    public = (
        ray.exceptions.RayActorError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.ObjectLostError,
        torch.distributed.DistError,
    )
    try:
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError
    except ImportError as err:
        log.warning("Ray Train's health-check errors unavailable (%s): lost workers known by public types", err)
        return public
    return (*public, WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)


def clear_cuda_error() -> None:
    """Reset the thread's last CUDA error after a failed call we handle (cudaHostRegister of the
    batch slots), or torch raises it at the next kernel launch.

    Private: torch does not expose cudaGetLastError, so it is called through ctypes in the CUDA
    runtime torch has loaded (found in /proc/self/maps: the same library instance, so the same
    per-thread error state). Fallback: none is safe, since the stale error would surface in an
    unrelated kernel; RuntimeError says how to run without the slots.
    """
    try:
        with open(PROC_MAPS) as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        paths = set()
    if not paths:
        raise RuntimeError(
            "a CUDA call on the loader's batch slots failed, and the CUDA runtime library "
            "to reset the error in was not found; set loader.num_workers: 0 to avoid the slots."
        )
    ctypes.CDLL(paths.pop()).cudaGetLastError()


def loopback_only_ray() -> bool:
    """Ray's single-machine mode (its default on macOS and Windows) for clusters started here:
    the node's address becomes 127.0.0.1, so the GCS, raylet, agents and workers bind loopback
    only; otherwise they bind every interface whatever --node-ip-address says.

    Public: the environment variable, which Ray reads when it is imported, so it reaches every
    process the cluster starts. Private: `ray._private.ray_constants.ENABLE_RAY_CLUSTER`, for this
    process when it imported Ray before the variable was set. Fallback when that constant is
    gone: the variable alone, which is enough unless Ray was imported first (then a warning).
    -> True when this process is in single-machine mode for certain.
    """
    os.environ[SINGLE_MACHINE_RAY] = "0"
    try:
        from ray._private import ray_constants

        if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
            raise AttributeError("ray_constants.ENABLE_RAY_CLUSTER")
        ray_constants.ENABLE_RAY_CLUSTER = False
        return True
    except (ImportError, AttributeError) as err:
        log.warning(
            "Ray's single-machine switch not found (%s): set %s=0 before Python imports Ray "
            "to keep this process's cluster on 127.0.0.1",
            err,
            SINGLE_MACHINE_RAY,
        )
        return False


DASHBOARD_STARTUP = "RAY_DASHBOARD_STARTUP_TIMEOUT_S"
DASHBOARD_STARTUP_S = 900


def patient_dashboard_start(seconds: int = DASHBOARD_STARTUP_S) -> bool:
    """Wait up to `seconds` for a new local cluster's dashboard before ray.init fails.

    Why: Ray waits 60 s, then fails ray.init with the cluster half started (a GCS and no raylet).
    The dashboard starts ten module processes, and on a busy 2-core machine they took 7 minutes
    to come up (a CI run, 2026-12-03); the project keeps the dashboard on (dfcvae.cluster).
    Public: the environment variable, read when Ray is imported. Private:
    `ray._private.ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S`, which the head's start-up reads,
    for this process when it imported Ray first. Fallback when that constant is gone: the
    variable alone (then a warning). -> True when this process waits `seconds` for certain.
    """
    os.environ.setdefault(DASHBOARD_STARTUP, str(seconds))
    try:
        from ray._private import ray_constants

        current = ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(int(current), seconds)
        return True
    except (ImportError, AttributeError) as err:
        log.warning(
            "Ray's dashboard start-up timeout not found (%s): set %s before Python imports Ray", err, DASHBOARD_STARTUP
        )
        return False


_STORE: dict[str, object] = {}  # in the rank-0 worker: the rendezvous store and its socket, kept alive


def torch_config(backend: str, timeout_s: int = 1800, socket_ifname: str = ""):
    """Ray Train's TorchConfig for `backend`, whose process group rendezvouses through a store that
    rank 0 serves on its node's own address only (127.0.0.1 on one machine, the node's cluster
    address on a cluster), and whose gloo and NCCL sockets use `socket_ifname`, or where that is ""
    and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are unset, the interface holding the node's address.

    Why: Ray Train's own setup has rank 0 start torch.distributed's TCPStore, which listens on
    every interface (`*:PORT`, no authentication), and the worker's DataLoader processes inherit
    that socket; and gloo picks its interface from the host name, which on a multi-homed host can
    be the wrong network. Here rank 0 binds a socket to its node's address itself and hands it to
    the store (`TCPStore(master_listen_fd=...)`, public). tests/test_hosts.py checks both across
    network namespaces.

    Private: `ray.train.torch.config._TorchBackend` (subclassed, to replace its on_start) and
    `_set_torch_distributed_env_vars` (LOCAL_RANK etc., as Ray Train sets them). Fallback when
    they are gone: Ray Train's plain TorchConfig, with a warning that the store binds every interface.
    """
    from ray.train.torch import TorchConfig

    try:
        from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend
    except ImportError as err:
        log.warning(
            "Ray Train's torch backend internals not found (%s): its store listens on every interface, "
            "and scaling.socket_ifname is not applied",
            err,
        )
        return TorchConfig(backend=backend, timeout_s=timeout_s)

    class NodeAddressTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            import ray

            size, timeout = len(worker_group), backend_config.timeout_s
            address = worker_group.execute_single(0, _node_address)
            port = worker_group.execute_single(0, _serve_store, address, size, timeout)
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get(
                [
                    worker_group.execute_single_async(
                        rank, _join_process_group, backend, rank, size, address, port, timeout, socket_ifname
                    )
                    for rank in range(size)
                ]
            )

    class NodeAddressTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return NodeAddressTorchBackend

    return NodeAddressTorchConfig(backend=backend, timeout_s=timeout_s)


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _serve_store(address: str, world_size: int, timeout_s: float) -> int:
    """In rank 0: the rendezvous store on a socket bound to `address` (its node's); -> its port."""
    import datetime
    import socket

    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(  # not waiting here for the other ranks: they connect in _join_process_group
        address, port, world_size, True, timeout, wait_for_workers=False, master_listen_fd=listener.fileno()
    )
    _STORE.update(store=store, listener=listener)
    return port


def process_group_network() -> dict[str, str | None]:
    """In a training worker: where its process group talks. "store": the rendezvous store's
    address:port in rank 0 (None elsewhere); "socket_ifname": gloo's interface (GLOO_SOCKET_IFNAME)."""
    listener = _STORE.get("listener")
    store = None
    if listener is not None:
        host, port = listener.getsockname()[:2]
        store = f"{host}:{port}"
    return {"store": store, "socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds `address` on this host (lo for 127.0.0.1),
    or None when none does."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None


def _join_process_group(
    backend: str, rank: int, world_size: int, address: str, port: int, timeout_s: float, socket_ifname: str
) -> None:
    import datetime

    import torch.distributed as dist

    own = interface_of(_node_address())
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # gloo's connections, NCCL's bootstrap
        chosen = socket_ifname or os.environ.get(variable) or own
        if chosen:
            os.environ[variable] = chosen
    if backend == "nccl" and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(os.environ):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # as Ray Train sets it: a hung collective fails
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _STORE["store"] if rank == 0 else dist.TCPStore(address, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
