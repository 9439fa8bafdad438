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
    forkserver alike). Used by dfcvae.ring for the loader's batch slots.

    Private: `torch.UntypedStorage._new_shared` allocates straight in shared memory.
    Fallback: a tensor allocated in ordinary memory, then moved by the public `share_memory_()`,
    which briefly holds the slots twice (once, at loader start).
    """
    try:
        return torch.UntypedStorage._new_shared(nbytes)
    except (AttributeError, TypeError) as err:
        log.warning("torch.UntypedStorage._new_shared unavailable (%s): allocating, then sharing", err)
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()


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
