"""The loader: one rank's batches of an epoch, read from the shards in the plan's order.

Batches are dicts:
    image  uint8 (B, 3, H, W), channels_last in memory, on make_loader's `device` (else the host);
           `prepare_batch` makes floats on the device
    attrs  int8 (B, 40) in ATTRIBUTE_NAMES order: 1 present, 0 absent, -1 unknown (no attribute
           data, e.g. data.source: folder)
    key    list[str], the image ids

The order is dfcvae.shards.plan's. With DataLoader processes, batches arrive through shared
slots (dfcvae.shards.slots).

Safety: members are decoded by extension, only .npy (allow_pickle=False), .png and .attrs; any
other member (a .pyd or .pth pickle, say) is never read, and a member name that repeats within
one sample is damage, as webdataset's `group_by_keys` treats it. A truncated or corrupt shard
raises ShardError naming it, unless loader.corrupt_tolerance allows skipping: then the skipped
samples are logged, counted in `ShardLoader.skipped`, and replaced by repeats of the stream's
recent samples so the batch count still holds. With loader.verify_shards (the default), each
process checks a shard's bytes against the manifest's sha256 the first time it reads it,
before using any sample of it: a changed byte makes the whole shard corrupt, never a silently
wrong image.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dfcvae.config import Config
from dfcvae.shards.format import (
    ATTRIBUTE_NAMES,
    ATTRS_MEMBER,
    IMAGE_MEMBERS,
    DataError,
    ShardError,
    decode_attrs,
    decode_image,
    open_url,
    read_manifest,
    split_info,
    split_member,
)
from dfcvae.shards.plan import Segment, Stream, batches_per_epoch, count_batches, plan_epoch
from dfcvae.shards.slots import BatchRing
from dfcvae.shards.tar import tar_members

log = logging.getLogger(__name__)

PREFETCH = 2  # batches each DataLoader process reads ahead


class _Skips:
    """Samples skipped in this process, checked against loader.corrupt_tolerance."""

    def __init__(self, tolerance: int):
        self.tolerance = tolerance
        self.total = 0
        self.pending: list[tuple[str, int]] = []  # reported with the next batch

    def skip(self, url: str, count: int, reason: str) -> None:
        self.total += count
        if self.total > self.tolerance:
            raise ShardError(
                f"corrupt shard {url}: {reason}; re-create the shards with `dvc repro shard` (or raise "
                f"loader.corrupt_tolerance, now {self.tolerance}, to skip up to that many samples)."
            )
        log.warning("skipping %d samples of corrupt shard %s: %s (%d skipped so far)", count, url, reason, self.total)
        self.pending.append((url, count))


# (url, manifest sha256) of the shards this process has checked, and of those whose bytes differed.
_VERIFIED: set[tuple[str, str]] = set()
_DAMAGED: dict[tuple[str, str], str] = {}


def _open_verified(seg: Segment) -> BinaryIO:
    """The shard's stream. At this process's first read of a shard with a hash, the whole shard is
    read and hashed before any of its samples is used: a flipped byte anywhere is never trained
    on. Later reads stream it as they always do (docs/data.md has the cost). ShardError when the
    bytes differ from the manifest's, that time and every later time."""
    key = (seg.url, seg.sha256)
    if key in _DAMAGED:
        raise ShardError(f"{seg.url}: {_DAMAGED[key]}")
    if not seg.sha256 or key in _VERIFIED:
        return open_url(seg.url)
    with open_url(seg.url) as stream:
        content = stream.read()
    actual = hashlib.sha256(content).hexdigest()
    if actual != seg.sha256:
        _DAMAGED[key] = (
            f"its sha256 {actual[:12]}... differs from the manifest's {seg.sha256[:12]}...: "
            "the shard was changed or damaged after it was written"
        )
        raise ShardError(f"{seg.url}: {_DAMAGED[key]}")
    _VERIFIED.add(key)
    return io.BytesIO(content)


def read_segment(seg: Segment, image_ext: str) -> Iterator[dict]:
    """Samples seg.begin..seg.end of one shard, as {"key", "url", image_ext: bytes, "attrs": bytes}.
    ShardError, naming the shard, for damage: a bad tar, a member name repeated within a sample,
    fewer samples than the manifest lists."""
    index, sample = -1, None
    try:
        with _open_verified(seg) as stream:
            for name, buffer, start, size in tar_members(stream):
                key, ext = split_member(name)
                if sample is None or key != sample["key"]:
                    if sample is not None and index >= seg.begin:
                        yield _complete(sample, seg, image_ext)
                    index += 1
                    sample = {"key": key, "url": seg.url, "members": set()}
                    if index >= seg.end:
                        return
                if ext in sample["members"]:
                    raise ValueError(f"member {name} appears twice in sample {key}")
                sample["members"].add(ext)
                if index >= seg.begin and ext in (image_ext, ATTRS_MEMBER):
                    sample[ext] = buffer[start : start + size]
    except (OSError, ValueError) as e:
        raise ShardError(f"{seg.url}: {e}") from e
    if sample is not None and index >= seg.begin:
        yield _complete(sample, seg, image_ext)
    if index + 1 < seg.end:
        raise ShardError(f"{seg.url}: ended after {index + 1} samples but the manifest lists {seg.shard_count}")


def _complete(sample: dict, seg: Segment, image_ext: str) -> dict:
    for ext in (image_ext, ATTRS_MEMBER):
        if ext not in sample:
            raise ShardError(f"{seg.url}: sample {sample['key']} has no .{ext} member")
    return sample


def _read_segments(segments: list[Segment], image_ext: str, skips: _Skips) -> Iterator[dict]:
    for seg in segments:
        read = 0
        try:
            for sample in read_segment(seg, image_ext):
                read += 1
                yield sample
        except ShardError as e:
            skips.skip(seg.url, seg.end - seg.begin - read, str(e).removeprefix(f"{seg.url}: "))


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class _EpochDataset(IterableDataset):
    """Yields the rank's batches skip_batches.. in order, split over DataLoader processes."""

    def __init__(
        self,
        streams: list[Stream],
        *,
        n_batches: int,
        skip_batches: int,
        batch_size: int,
        image_size: int,
        image_ext: str,
        shuffle_buffer: int,
        tolerance: int,
        ring: BatchRing | None,
    ):
        self.streams = streams
        self.n_batches = n_batches
        self.skip_batches = skip_batches
        self.batch_size = batch_size
        self.image_size = image_size
        self.image_ext = image_ext
        self.shuffle_buffer = shuffle_buffer
        self.tolerance = tolerance
        self.ring = ring  # None: batches are yielded as tensors

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skips = _Skips(self.tolerance)
        running: dict[int, Iterator[dict]] = {}
        # DataLoader takes batches from its processes in turn, so process w serves batches
        # skip_batches + w, + w + workers, ...; a stream's batches all fall to one process.
        try:
            for j in range(self.skip_batches + worker, self.n_batches, workers):
                v = j % len(self.streams)
                if v not in running:
                    running[v] = self._batches(self.streams[v], skips)
                message = self._deliver(j, next(running[v]))
                if message is None:  # the loader was closed
                    return
                message.skipped, skips.pending = skips.pending, []
                yield message
        except ShardError as e:  # delivered as data: ShardLoader raises it with this message alone
            yield _Message(error=str(e))

    def _deliver(self, index: int, batch: list[tuple]) -> _Message | None:
        """Batch `index` as tensors, or written into the ring with only its number and keys to send."""
        keys = [b[2] for b in batch]
        if self.ring is None:
            return _Message(keys, tensors=_collate(batch))
        if not self.ring.put(index, [b[0] for b in batch], [b[1] for b in batch]):
            return None
        return _Message(keys, slot_batch=index)

    def _batches(self, stream: Stream, skips: _Skips) -> Iterator[list[tuple]]:
        samples = _read_segments(stream.segments, self.image_ext, skips)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(stream.seed))
        recent: deque[tuple] = deque(maxlen=self.batch_size)
        for i in range(stream.n_batches):
            if stream.first + i * len(self.streams) < self.skip_batches:
                for _ in range(self.batch_size):  # fast-forward without decoding
                    next(samples, None)
                continue
            batch: list[tuple] = []
            while len(batch) < self.batch_size and (sample := next(samples, None)) is not None:
                try:
                    batch.append(self._decode(sample))
                except (ValueError, OSError) as e:
                    skips.skip(sample["url"], 1, f"sample {sample['key']}: {e}")
            recent.extend(batch)
            if len(batch) < self.batch_size:  # samples were skipped: repeat recent ones
                if not recent:
                    raise ShardError(f"{stream.segments[0].url}: no readable samples left to fill a batch")
                batch += [recent[k % len(recent)] for k in range(self.batch_size - len(batch))]
            yield batch

    def _decode(self, sample: dict) -> tuple:
        image = decode_image(self.image_ext, sample[self.image_ext], self.image_size)
        return image, decode_attrs(sample[ATTRS_MEMBER]), sample["key"]


@dataclass
class _Message:
    """What a loader process sends for one batch: its keys with the batch as tensors or the number
    it was written under in the slots; the samples skipped since the last message; or an error."""

    keys: list[str] = field(default_factory=list)
    tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # (images, attrs), without slots
    slot_batch: int | None = None
    skipped: list[tuple[str, int]] = field(default_factory=list)  # (shard url, samples)
    error: str | None = None

    def pin_memory(self) -> _Message:
        """DataLoader's pin_memory calls this (CUDA, no slots): the tensors go to page-locked memory."""
        if self.tensors is not None:
            self.tensors = tuple(t.pin_memory() for t in self.tensors)
        return self


def _collate(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, H, W, 3)
    # (B, 3, H, W), channels_last in memory; (B, 40) int8
    return images.permute(0, 3, 1, 2), torch.from_numpy(np.stack([b[1] for b in batch]))


def _as_is(message: _Message) -> _Message:
    return message


class ShardLoader:
    """Iterable over one rank's batches of one epoch; counts samples skipped from corrupt shards.

    With DataLoader processes, batches arrive through a BatchRing's shared slots. Images are
    delivered on `device` (None: the host) as the batch's own copy, so a batch the consumer keeps
    stays valid after its slot is reused.
    """

    def __init__(
        self, loader: DataLoader, n_batches: int, tolerance: int, ring: BatchRing | None, device: torch.device | None
    ):
        self.loader = loader
        self.n_batches = n_batches
        self.tolerance = tolerance
        self.ring = ring
        self.device = device
        self.skipped = 0
        self.skipped_by_shard: dict[str, int] = {}
        self._batches: Iterator[dict] | None = None

    def __len__(self) -> int:
        return self.n_batches

    def start(self) -> ShardLoader:
        """Start the worker processes now (they read ahead until their queues are full)."""
        if self._batches is None:
            if self.ring is not None:
                self.ring.reset()  # a second pass over the loader reuses the slots from the start
            self._batches = iter(self.loader)
            if self.ring is not None and self.device is not None and self.device.type == "cuda":
                self.ring.page_lock()  # now, while an earlier epoch may still be running
        return self

    def close(self) -> None:
        """Stop the loader processes and free the slots, whether or not the loader was iterated."""
        if self.ring is not None:
            self.ring.close()
        self._batches = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict]:
        self.start()
        batches, error, self._batches = self._batches, None, None
        try:
            for message in batches:
                error = message.error
                if error:
                    break
                for url, count in message.skipped:
                    self.skipped += count
                    self.skipped_by_shard[url] = self.skipped_by_shard.get(url, 0) + count
                if self.skipped > self.tolerance:  # each process checks its own; this is the rank's total
                    error = (
                        f"corrupt shards {sorted(self.skipped_by_shard)}: {self.skipped} samples skipped, "
                        f"more than loader.corrupt_tolerance={self.tolerance}; re-create them with "
                        f"`dvc repro shard`."
                    )
                    break
                yield self._receive(message)
                if self.ring is not None:
                    self.ring.settle()  # the next batch is wanted: free the last one's slot once copied
        finally:
            self.close()  # no DataLoader process may be left waiting for a slot
            del batches  # stops the worker processes before raising
        if error:
            raise ShardError(error)
        if self.skipped:
            log.warning("skipped %d samples from corrupt shards: %s", self.skipped, self.skipped_by_shard)

    def _receive(self, message: _Message) -> dict:
        if message.slot_batch is not None:
            image, attrs = self.ring.take(message.slot_batch, self.device)
        else:
            image, attrs = message.tensors
            if self.device is not None:
                image = image.to(self.device, non_blocking=True)
        return {"image": image, "attrs": attrs, "key": message.keys}


def make_loader(
    cfg: Config,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    train: bool,
    skip_batches: int = 0,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    rings_alive: int = 1,
) -> ShardLoader:
    """One rank's batches of `split` for `epoch`: exactly batches_per_epoch(...) - skip_batches.

    train: shuffle shards and samples (seeded by train.seed, epoch, rank); otherwise a fixed order.
    skip_batches: resume mid-epoch; batch k of the resumed loader is batch k of the full epoch.
    num_workers: DataLoader processes, a divisor of loader.num_workers (0 = in this process).
    device: where batches' images are delivered (None: the host).
    rings_alive: how many loaders' slots may be in shared memory at once, checked up front.
    """
    manifest = read_manifest(cfg)
    prep = manifest["preprocessing"]
    if prep["image_size"] != cfg.data.image_size:
        raise DataError(
            f"the shards in {cfg.data.shards_dir} are {prep['image_size']} px but data.image_size is "
            f"{cfg.data.image_size}: run `dvc repro shard` to re-shard."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}.")
    batch_size = batch_size or cfg.loader.batch_size
    streams = max(1, cfg.loader.num_workers)
    workers = cfg.loader.num_workers if num_workers is None else num_workers
    if streams % max(1, workers):
        raise ValueError(
            f"num_workers={workers} must divide loader.num_workers={streams}, which fixes the sample order."
        )
    info = split_info(manifest, split)
    n_batches = count_batches(info["count"], world_size, batch_size)
    if not 0 <= skip_batches <= n_batches:
        raise ValueError(f"skip_batches={skip_batches} is outside the epoch's {n_batches} batches.")
    plan = plan_epoch(cfg, info["shards"], n_batches, rank=rank, epoch=epoch, train=train, batch_size=batch_size)
    image_size = prep["image_size"]
    # Processes hand batches over through shared slots, one more than can be in flight at once:
    # PREFETCH per process, the batch being copied and the one the consumer holds.
    slots = PREFETCH * workers + 2
    ring = (
        BatchRing(slots, batch_size, image_size, len(ATTRIBUTE_NAMES), first=skip_batches, alive=rings_alive)
        if workers
        else None
    )
    device = torch.device(device) if device is not None else None
    dataset = _EpochDataset(
        plan,
        n_batches=n_batches,
        skip_batches=skip_batches,
        batch_size=batch_size,
        image_size=image_size,
        image_ext=IMAGE_MEMBERS[prep["encoding"]],
        shuffle_buffer=cfg.loader.shuffle_buffer if train else 0,
        tolerance=cfg.loader.corrupt_tolerance,
        ring=ring,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        collate_fn=_as_is,  # already tensors, or ring messages
        num_workers=workers,
        prefetch_factor=PREFETCH if workers else None,
        pin_memory=ring is None and device is not None and device.type == "cuda",
        persistent_workers=False,
    )
    return ShardLoader(loader, n_batches - skip_batches, cfg.loader.corrupt_tolerance, ring, device)


def train_stream(
    cfg: Config, *, rank: int = 0, world_size: int = 1, start: int = 0, device: torch.device | str | None = None
) -> Iterator[tuple[int, dict]]:
    """(step, batch) for steps start, start + 1, ... across epochs, endless; step k is batch
    k mod batches_per_epoch of epoch k // batches_per_epoch, as make_loader defines them, with
    images on `device`.

    The next epoch's worker processes start as soon as the current epoch's first batch has
    arrived, so their start-up and shuffle-buffer fill overlap this epoch instead of stalling
    the device at every epoch boundary.
    """
    per_epoch = batches_per_epoch(cfg, "train", world_size)
    epoch, skip = divmod(start, per_epoch)
    loader = functools.partial(make_loader, cfg, "train", rank=rank, world_size=world_size, train=True, device=device)
    # Three epochs' slots are alive at a time: this one's, the next one's (started early), and
    # the last one's, which this epoch's processes inherited when they forked.
    current, upcoming = loader(epoch=epoch, skip_batches=skip, rings_alive=3), None
    step = start
    try:
        while True:
            for i, batch in enumerate(current):
                if i == 0:
                    upcoming = loader(epoch=epoch + 1).start()
                yield step, batch
                step += 1
            epoch += 1
            current, upcoming = upcoming or loader(epoch=epoch), None
    finally:  # the consumer stopped (the generator closed): no loader process may be left waiting
        for left in (current, upcoming):
            if left is not None:
                left.close()


def prepare_batch(
    images: torch.Tensor, device: torch.device | str, *, train: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1] on `device`, channels_last.

    Runs on the device, so the DataLoader ships 1 byte per pixel. train: each image is flipped
    left-right with probability 1/2 (drawn from `generator`, on its device, when given).
    """
    x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    x = x.float().div_(127.5).sub_(1.0)
    if train:
        rng_device = generator.device if generator is not None else x.device
        flip = torch.rand(x.shape[0], generator=generator, device=rng_device) < 0.5
        if flip.device != x.device and x.device.type == "cuda":
            flip = flip.pin_memory()  # a pageable copy would wait for the device to finish the last step
        x = torch.where(flip.to(x.device, non_blocking=True).view(-1, 1, 1, 1), x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last)
