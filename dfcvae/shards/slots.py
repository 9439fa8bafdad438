"""Shared-memory slots that loader processes fill with batches in place, and that the main
process copies from straight to the device.

Why: a batch that a DataLoader process yields as tensors crosses into the main process through a
new shared-memory segment per tensor (allocated, filled by a copy, its file descriptor passed,
mapped, torn down), and with pin_memory the main process then copies the whole batch again into
page-locked memory. At tens of thousands of images per second that main process, the one that
also drives the GPU, is the bottleneck (README, Performance). Here a loader allocates its slots
once; a loader process decodes each image straight into a slot and sends only the batch number
and the keys; on CUDA the slots are page-locked (cudaHostRegister) once the loader processes
exist, so a batch reaches the device by one DMA from its slot, on a side stream.

Turns. Slot s serves batches first + s, first + s + S, first + s + 2S, ... (S slots), and
`turn[s]` holds the batch the slot is waiting for. A loader process writes batch j into slot
(j - first) mod S once its turn says j; the main process moves the turn on to j + S when batch
j's copy has completed. So no batch is overwritten before it has been copied, whatever order
the processes run in; with S above the DataLoader's prefetch depth, no process waits while the
main process keeps up. CLOSED in a turn tells waiting processes the loader is gone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dfcvae.internals import clear_cuda_error, new_shared_storage

log = logging.getLogger(__name__)

CLOSED = -1
POLL_S = 0.0002  # how often a waiting loader process looks at its slot's turn
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every device's context
SHARED_MEMORY = "/dev/shm"  # where Linux keeps shared memory; containers often make it small


def shared_memory_free() -> int | None:
    """Bytes free for shared memory, or None where there is no /dev/shm to ask."""
    try:
        stat = os.statvfs(SHARED_MEMORY)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def check_shared_memory(needed: int) -> None:
    """Fail now, in words, rather than with a bus error in a loader process halfway through."""
    free = shared_memory_free()
    if free is not None and needed > free:
        raise RuntimeError(
            f"the loader needs {needed / 2**20:.0f} MiB of shared memory for its batch slots but "
            f"{SHARED_MEMORY} has {free / 2**20:.0f} MiB free: give the container more (docker run "
            f"--shm-size, or the memory-backed /dev/shm volume of infra/k8s), or lower "
            f"loader.batch_size or loader.num_workers."
        )


class BatchRing:
    """S slots of (batch, H, W, 3) uint8 images and (batch, attrs) int8 rows in shared memory."""

    def __init__(self, slots: int, batch_size: int, image_size: int, attrs: int, first: int = 0, alive: int = 1):
        """alive: how many rings of this size may be in shared memory at once; checked up front."""
        self.slots, self.first = slots, first
        image_bytes = slots * batch_size * image_size * image_size * 3
        attr_bytes = slots * batch_size * attrs
        turn_offset = -(-(image_bytes + attr_bytes) // 8) * 8
        check_shared_memory(alive * (turn_offset + 8 * slots))
        # Shared memory pickles as a handle, so this works with fork, spawn and forkserver alike.
        storage = new_shared_storage(turn_offset + 8 * slots)
        memory = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.images = memory[:image_bytes].view(slots, batch_size, image_size, image_size, 3)
        self.attrs = memory[image_bytes : image_bytes + attr_bytes].view(torch.int8).view(slots, batch_size, attrs)
        self.turn = memory[turn_offset:].view(torch.int64)
        self._memory = memory
        self._pending: list[tuple[int, int, torch.cuda.Event]] = []  # (slot, batch, copy done)
        self._stream: torch.cuda.Stream | None = None
        self._locked: bool | None = None  # page-locked; None: not tried yet
        self.reset()

    def reset(self) -> None:
        """Every slot free, waiting for its first batch: before each pass's processes start."""
        self.turn.copy_(torch.arange(self.first, self.first + self.slots))

    @property
    def page_locked(self) -> bool:
        return bool(self._locked)

    def slot(self, index: int) -> int:
        return (index - self.first) % self.slots

    # ------------------------------------------------------------------ loader processes

    def put(self, index: int, images: Sequence[np.ndarray], attrs: Sequence[np.ndarray]) -> bool:
        """Write batch `index` into its slot once the slot's turn comes; False if the loader closed."""
        slot = self.slot(index)
        while (turn := int(self.turn[slot])) != index:
            if turn == CLOSED:
                return False
            time.sleep(POLL_S)
        np.stack(images, out=self.images[slot].numpy())
        np.stack(attrs, out=self.attrs[slot].numpy())
        return True

    # ------------------------------------------------------------------ the main process

    def take(self, index: int, device: torch.device | None) -> tuple[Tensor, Tensor]:
        """Batch `index` as (images (B, 3, H, W) channels_last on `device`, attrs (B, attrs) on the host).

        On CUDA the copy runs on a side stream that the current stream waits for; the slot is
        freed by `settle()` once the copy has completed. Elsewhere the images are cloned and the
        slot is freed at once.
        """
        slot = self.slot(index)
        images = self.images[slot].permute(0, 3, 1, 2)  # (B, 3, H, W), channels_last in memory
        attrs = self.attrs[slot].clone()
        if device is None or device.type != "cuda":
            images = images.to(device or "cpu", copy=True)
            self._release(slot, index)
            return images, attrs
        self.page_lock()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):
            on_device = images.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        current = torch.cuda.current_stream(device)
        current.wait_stream(self._stream)
        on_device.record_stream(current)  # allocated on the side stream, used on the current one
        self._pending.append((slot, index, done))
        return on_device, attrs

    def settle(self) -> None:
        """Free the slots of the batches taken so far, waiting for their copies to complete."""
        for slot, index, done in self._pending:
            done.synchronize()
            self._release(slot, index)
        self._pending.clear()

    def close(self) -> None:
        """Let waiting loader processes go, and release the page lock."""
        try:
            self.settle()
        finally:  # after settle, whose releases would overwrite CLOSED
            self.turn.fill_(CLOSED)
            if self._locked:
                error = torch.cuda.cudart().cudaHostUnregister(self._memory.data_ptr())
                if int(error) != 0:
                    clear_cuda_error()
                self._locked = None

    def _release(self, slot: int, index: int) -> None:
        self.turn[slot] = index + self.slots

    def page_lock(self) -> None:
        """Page-lock the slots for DMA (CUDA), once. Only after the loader processes have started:
        the driver may mark locked pages not to be inherited by processes forked later."""
        if self._locked is not None:
            return
        memory = self._memory
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(memory.data_ptr(), memory.numel(), HOST_REGISTER_PORTABLE)
        self._locked = int(error) == 0
        if not self._locked:  # still correct: copies from pageable memory are staged, not async
            clear_cuda_error()
            log.warning(
                "cudaHostRegister failed (%s): host-to-device copies of batches will be slower",
                cudart.cudaGetErrorString(error),
            )
