"""Each private-API use in dfcvae/internals.py, and the fallback that runs when it is gone."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest
import torch

from dfcvae import internals, tracking
from dfcvae.shards.slots import BatchRing


def test_shared_storage_is_shared_memory():
    storage = internals.new_shared_storage(4096)
    assert storage.is_shared() and storage.nbytes() == 4096


def test_shared_storage_falls_back_to_share_memory_when_the_private_call_is_gone(monkeypatch, caplog):
    def gone(*args, **kwargs):
        raise AttributeError("_new_shared")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", gone)
    with caplog.at_level(logging.WARNING, logger="dfcvae.internals"):
        storage = internals.new_shared_storage(4096)
    assert storage.is_shared() and storage.nbytes() == 4096
    assert "allocating, then sharing" in caplog.text
    ring = BatchRing(slots=2, batch_size=3, image_size=4, attrs=40)  # the ring still works on it
    assert ring.put(0, [np.full((4, 4, 3), 7, np.uint8)] * 3, [np.zeros(40, np.int8)] * 3)
    images, _ = ring.take(0, None)
    assert images.shape == (3, 3, 4, 4) and int(images.min()) == 7
    ring.close()


@pytest.mark.parametrize("maps", ["no-cudart", "missing"])
def test_a_cuda_error_that_cannot_be_reset_is_an_error_saying_how_to_avoid_it(tmp_path, monkeypatch, maps):
    path = tmp_path / "maps"
    if maps == "no-cudart":
        path.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n")
    monkeypatch.setattr(internals, "PROC_MAPS", str(path))
    with pytest.raises(RuntimeError, match="loader.num_workers: 0"):
        internals.clear_cuda_error()


def test_loopback_only_ray_sets_the_switch_and_the_constant(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.delenv(internals.SINGLE_MACHINE_RAY, raising=False)
    assert internals.loopback_only_ray() is True
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert os.environ[internals.SINGLE_MACHINE_RAY] == "0"


def test_loopback_only_ray_falls_back_to_the_variable_and_says_so(monkeypatch, caplog):
    from ray._private import ray_constants

    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")  # as a Ray release without it
    monkeypatch.delenv(internals.SINGLE_MACHINE_RAY, raising=False)
    with caplog.at_level(logging.WARNING, logger="dfcvae.internals"):
        assert internals.loopback_only_ray() is False
    assert os.environ[internals.SINGLE_MACHINE_RAY] == "0"
    assert "before Python imports Ray" in caplog.text


def test_importing_tracking_sets_no_environment_and_setup_bounds_mlflow_retries(tmp_path, monkeypatch):
    import subprocess

    code = "import os, dfcvae.tracking; print(sorted(k for k in os.environ if k.startswith('MLFLOW_HTTP')))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for name in tracking.HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")  # the user's value wins
    tracking.bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"


def test_torch_config_binds_the_store_to_the_nodes_address_through_ray_trains_backend():
    config = internals.torch_config("gloo")
    assert config.backend == "gloo" and config.backend_cls.__name__ == "NodeAddressTorchBackend"
    assert internals.interface_of("127.0.0.1") in ("lo", "lo0") and internals.interface_of("192.0.2.1") is None


def test_torch_config_falls_back_to_ray_trains_own_when_its_backend_is_gone(monkeypatch, caplog):
    import ray.train.torch.config as ray_torch_config
    from ray.train.torch import TorchConfig

    monkeypatch.delattr(ray_torch_config, "_TorchBackend")
    with caplog.at_level(logging.WARNING, logger="dfcvae.internals"):
        config = internals.torch_config("gloo")
    assert type(config) is TorchConfig and config.backend == "gloo"
    assert "listens on every interface" in caplog.text


def test_lost_workers_are_known_by_ray_trains_health_check_and_without_it_by_public_types(monkeypatch, caplog):
    import ray.exceptions
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError("worker 1 died", RuntimeError("actor died"))
    loader = RuntimeError("DataLoader worker (pid(s) 4321) exited unexpectedly")
    assert internals.lost_worker(died) and internals.lost_worker(loader)
    assert internals.lost_worker(torch.distributed.DistNetworkError("Connection reset by peer"))
    assert not internals.lost_worker(OSError(28, "No space left on device"))
    assert not internals.lost_worker(RuntimeError("CUDA error: device-side assert triggered"))
    monkeypatch.setitem(sys.modules, "ray.train.v2._internal.exceptions", None)  # the private module gone
    with caplog.at_level(logging.WARNING, logger="dfcvae.internals"):
        public = internals.lost_worker_errors()
    assert ray.exceptions.RayActorError in public and WorkerHealthCheckFailedError not in public
    assert "lost workers known by public types" in caplog.text


def test_a_local_clusters_dashboard_is_waited_for_and_without_rays_constant_the_variable_still_is(monkeypatch, caplog):
    from ray._private import ray_constants

    monkeypatch.delenv(internals.DASHBOARD_STARTUP, raising=False)
    monkeypatch.setattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 60)
    assert internals.patient_dashboard_start(900) is True
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == 900 and os.environ[internals.DASHBOARD_STARTUP] == "900"
    monkeypatch.delenv(internals.DASHBOARD_STARTUP)
    monkeypatch.delattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S")
    with caplog.at_level(logging.WARNING, logger="dfcvae.internals"):
        assert internals.patient_dashboard_start(900) is False
    assert os.environ[internals.DASHBOARD_STARTUP] == "900" and "dashboard start-up timeout not found" in caplog.text
