"""Ray: join the cluster in RAY_ADDRESS, or start one on this machine bound to 127.0.0.1."""

from __future__ import annotations

import os
import socket

from dfcvae.internals import loopback_only_ray


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
    import ray

    context = ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
    )
    return context.address_info["gcs_address"]


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
