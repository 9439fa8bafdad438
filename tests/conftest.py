"""Shared fixtures: a tiny config on small synthetic CelebA-format shards."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from dfcvae.config import Config

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data.source": "synthetic",
    "data.synthetic_count": 120,
    "data.image_size": 32,
    "data.samples_per_shard": 16,
    "loader.batch_size": 8,
    "loader.num_workers": 1,
    "loader.shuffle_buffer": 16,
    "model.hidden_channels": [8, 16],
    "model.latent_dim": 8,
    "perceptual.backbone": "mobilenet_v2",
    "perceptual.layers": "vae123",
    "perceptual.weights": "imagenet",
    "eval.reference_backbone": "mobilenet_v2",
    "eval.reference_layers": "vae345",
    "eval.reference_weights": "imagenet",
    "eval.lpips_weights": "random",  # AlexNet's ImageNet file is not on this machine
    "train.compile": False,
    "scaling.use_gpu": False,
    "tune.enabled": False,
}


# `make test` runs the files on two workers (pytest-xdist, --dist loadfile), each file whole on
# one worker, in this order, longest first (seconds of one worker in a CI run, 2026-12-03), so
# that both workers finish at about the same time. xdist would otherwise reorder the files by
# their number of tests and start the long Ray and DVC files last: make passes
# --no-loadscope-reorder.
LONGEST_FIRST = (
    "test_pipeline.py",  # 560
    "test_train.py",  # 460
    "test_hosts.py",  # 240 (2026-12-04, alone)
    "test_tune.py",  # 230
    "test_pipeline_folder.py",  # 200
    "test_registry.py",  # 200
    "test_compare.py",  # 190
    "test_evaluate.py",  # 80
    "test_job.py",  # 60
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file


def tiny_config(root: Path, **overrides) -> Config:
    """The committed params.yaml shrunk to CPU-test size, with every path under `root`."""
    paths = {
        "data.inventory_dir": str(root / "inventory"),
        "data.shards_dir": str(root / "shards"),
        "train.out_dir": str(root / "train"),
        "tune.out_dir": str(root / "tune"),
        "eval.out_dir": str(root / "eval"),
        "registry.out_dir": str(root / "register"),
        "scaling.storage_dir": str(root / "ray"),
        "mlflow.local_db": str(root / "mlflow" / "mlflow.db"),
        "mlflow.local_artifacts": str(root / "mlflow" / "artifacts"),
    }
    return Config.load(ROOT / "params.yaml").with_overrides({**TINY, **paths, **overrides})


@pytest.fixture(scope="session")
def synthetic_cfg(tmp_path_factory) -> Config:
    """Synthetic faces fetched and sharded once per test session (32 px, 120 images)."""
    from dfcvae.fetch import fetch
    from dfcvae.sharding import write_shards

    cfg = tiny_config(tmp_path_factory.mktemp("synthetic"))
    fetch(cfg)
    write_shards(cfg)
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """The driver's tiny convolutions and FID's 2048-d eigendecompositions run up to 20x faster
    on one thread than on two busy shared CPU cores (threads spin waiting for each other)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU local Ray cluster per test module, started as the pipeline starts one; its GCS address."""
    import ray

    from dfcvae.cluster import start_local_ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_API_SERVER_ADDRESS", "")  # restored (unset) when the module ends
        yield start_local_ray(num_cpus=2)
        ray.shutdown()


# Waiting for something to start. A loaded 2-core machine starts an MLflow server or a Ray head
# in seconds or in minutes, so a wait ends when the thing is ready or when the process that
# should make it ready has exited (with its log), never at a guessed start-up time. HANG_S only
# ends a wait that nothing would end otherwise: a process alive but hung.
HANG_S = 1200.0


def wait_until(
    ready: Callable[[], object],
    what: str,
    *,
    process: subprocess.Popen | int | None = None,
    log: Path | None = None,
    poll_s: float = 0.5,
) -> None:
    """Poll ready() until it returns true; fails as soon as `process` (a Popen or a pid) has exited,
    with the tail of `log`, or after HANG_S of a live process that never gets there."""
    started = time.monotonic()
    while not ready():
        if process is not None and not _alive(process):
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(f"waiting for {what}: the process exited\n{tail}")
        if time.monotonic() - started > HANG_S:
            pytest.fail(f"waiting for {what}: not there after {HANG_S:.0f} s with the process alive (hung)")
        time.sleep(poll_s)


def _alive(process: subprocess.Popen | int) -> bool:
    if isinstance(process, subprocess.Popen):
        return process.poll() is None
    try:
        return psutil.Process(process).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def url_answers(url: str) -> bool:
    """The URL answers HTTP at all (an error status counts: the server is up)."""
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets(root_pid: int) -> list[tuple[str, int, psutil.Process]]:
    """(address, port, process) for every TCP socket listening in root_pid's process tree.

    One system-wide scan (one parse of /proc/net/tcp*): asking each process in turn parses the
    whole table once per process, 165 ms of CPU per poll for a 20-process Ray node against 20 ms,
    and a poll loop in the test's process then starves a driver thread beside it of the GIL.
    """
    root = psutil.Process(root_pid)
    tree = {proc.pid: proc for proc in (root, *root.children(recursive=True))}
    return [
        (c.laddr.ip, c.laddr.port, tree[c.pid])
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in tree
    ]


def assert_loopback_only(root_pid: int, at_least: int = 1) -> None:
    """Every TCP socket listening in root_pid's process tree is on loopback; waits, while the
    process lives, for at least `at_least` of them (a node's agents start after its dashboard answers)."""
    wait_until(
        lambda: len(listening_sockets(root_pid)) >= at_least,
        f"{at_least} listening sockets under process {root_pid}",
        process=root_pid,
    )
    sockets = listening_sockets(root_pid)
    exposed = [s for s in sockets if s[0] not in LOOPBACK]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
