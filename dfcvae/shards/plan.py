"""The epoch plan: which samples of which shards each rank, and each stream within a rank, reads.

Every rank yields exactly `batches_per_epoch` full batches, so DDP steps stay in lockstep. The
epoch is a sequence of T = batches * world_size * batch_size positions over the concatenated
shards (shard order shuffled by (train.seed, epoch) when train; fixed otherwise); position p
reads sample p mod N. So every sample is seen once per epoch and the T - N positions past the
end wrap round to the start: that many samples are seen twice (at most world_size * batch_size
- 1, the same padding DistributedSampler uses). Rank r reads the contiguous range
[r T/ws, (r+1) T/ws). Within a rank, batch j comes from stream j mod V, V = loader.num_workers;
each stream reads a contiguous part of the rank's range through its own shuffle buffer (train
only). The order is therefore a function of (train.seed, epoch, rank, world_size, batch_size,
loader.num_workers, loader.shuffle_buffer) and not of how many DataLoader processes run the
streams (any divisor of V), so a loader that skips k batches resumes exactly at batch k.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

import numpy as np

from dfcvae.config import Config
from dfcvae.shards.format import read_manifest, shard_url, split_info


@dataclass(frozen=True)
class Segment:
    url: str
    begin: int  # sample indices within the shard, end exclusive
    end: int
    shard_count: int  # samples the manifest lists for the shard
    sha256: str = ""  # the manifest's hash of the shard: checked at a process's first read ("" = not checked)


@dataclass(frozen=True)
class Stream:
    """One stream's share of a rank's epoch: batches first + i * V for i < n_batches."""

    first: int
    n_batches: int
    segments: list[Segment]
    seed: int  # for the shuffle buffer; unused when not shuffling


def batches_per_epoch(cfg: Config, split: str, world_size: int, batch_size: int | None = None) -> int:
    """Full batches each rank yields per epoch: ceil(N / (world_size * batch_size))."""
    count = split_info(read_manifest(cfg), split)["count"]
    return count_batches(count, world_size, batch_size or cfg.loader.batch_size)


def count_batches(count: int, world_size: int, batch_size: int) -> int:
    return math.ceil(count / (world_size * batch_size))


def plan_epoch(
    cfg: Config, shards: list[dict], n_batches: int, *, rank: int, epoch: int, train: bool, batch_size: int
) -> list[Stream]:
    """The loader.num_workers streams of rank `rank`'s n_batches batches of `epoch`, over the
    split's `shards` (the manifest's entries, in the manifest's order)."""
    streams = max(1, cfg.loader.num_workers)
    shards = _epoch_shards(cfg, shards, train, epoch)
    start = rank * n_batches * batch_size
    plan = []
    for v, count in enumerate(_stream_batches(n_batches, streams)):
        stop = start + count * batch_size
        segments = _segments(cfg, shards, start, stop) if count else []
        plan.append(Stream(first=v, n_batches=count, segments=segments, seed=seed(cfg.train.seed, epoch, rank, v)))
        start = stop
    return plan


def seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


def _epoch_shards(cfg: Config, shards: list[dict], train: bool, epoch: int) -> list[dict]:
    if not train:
        return shards
    order = list(range(len(shards)))
    random.Random(seed(cfg.train.seed, epoch)).shuffle(order)  # the same on every rank
    return [shards[i] for i in order]


def _segments(cfg: Config, shards: list[dict], start: int, stop: int) -> list[Segment]:
    """Positions [start, stop) of the concatenated shards, wrapping round past the end."""
    bounds = [0]
    for shard in shards:
        bounds.append(bounds[-1] + shard["count"])
    total, out, p = bounds[-1], [], start
    while p < stop:
        q = p % total
        i = bisect.bisect_right(bounds, q) - 1
        take = min(bounds[i + 1] - q, stop - p)
        shard = shards[i]
        sha256 = shard.get("sha256", "") if cfg.loader.verify_shards else ""
        out.append(Segment(shard_url(cfg, shard["name"]), q - bounds[i], q - bounds[i] + take, shard["count"], sha256))
        p += take
    return out


def _stream_batches(n_batches: int, streams: int) -> list[int]:
    """Batches of each stream: stream v makes batches v, v + V, v + 2V, ..."""
    return [max(0, math.ceil((n_batches - v) / streams)) for v in range(streams)]
