"""The data pipeline: fetch -> shard -> loader, on small generated data."""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from dfcvae.config import Config
from dfcvae.fetch import fetch, inputs_changed
from dfcvae.images import preprocess
from dfcvae.inventory import read_table, rows
from dfcvae.sharding import write_shards
from dfcvae.shards import loader as shard_loader
from dfcvae.shards import slots
from dfcvae.shards import tar as tar_walker
from dfcvae.shards.format import (
    ATTRIBUTE_NAMES,
    SPLITS,
    DataError,
    ShardError,
    decode_attrs,
    encode_attrs,
    manifest_hash,
    read_manifest,
    split_member,
)
from dfcvae.shards.loader import PREFETCH, make_loader, prepare_batch, read_segment, train_stream
from dfcvae.shards.plan import Segment, batches_per_epoch
from dfcvae.shards.slots import BatchRing
from dfcvae.shards.tar import tar_members
from dfcvae.shards.writer import add_member
from dfcvae.synthetic import SYNTHETIC_ATTRIBUTES, draw_face
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def make_config(root: Path, overrides: dict | None = None) -> Config:
    """The tests' tiny config with 33 synthetic faces at 32 px: train 27 in shards of 10, 10, 7;
    batches of 4 from 2 streams."""
    small = {
        "data.synthetic_count": 33,
        "data.samples_per_shard": 10,
        "loader.batch_size": 4,
        "loader.num_workers": 2,
        "loader.shuffle_buffer": 8,
        "train.seed": 0,
    }
    return tiny_config(root, **{**small, **(overrides or {})})


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Config:
    cfg = make_config(tmp_path_factory.mktemp("synthetic"))
    fetch(cfg)
    write_shards(cfg)
    return cfg


@pytest.fixture
def shard_copy(sharded, tmp_path) -> Config:
    """A private copy of the shards, for tests that damage them. Read unchecked (verify_shards off),
    as a stream is: these tests are of the tar reader's own handling of damage."""
    shutil.copytree(sharded.data.shards_dir, tmp_path / "shards")
    return sharded.with_overrides({"data.shards_dir": str(tmp_path / "shards"), "loader.verify_shards": False})


def read_inventory(cfg: Config) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The inventory fetch wrote: key -> split (0/1/2), and key -> attributes (0/1) where it has them."""
    found = rows(read_table(Path(cfg.data.inventory_dir)))
    return {r.key: r.split for r in found}, {r.key: list(r.attrs) for r in found if r.attrs is not None}


def write_partition(root: Path, partition: dict[str, int]) -> None:
    """CelebA's list_eval_partition.txt: "000001.jpg 0" per image."""
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{name} {part}\n" for name, part in sorted(partition.items()))
    )


def write_attrs(root: Path, attrs: dict[str, list[int]]) -> None:
    """CelebA's list_attr_celeba.txt: count, the 40 names, then one row of 1/-1 per image."""
    lines = [f"{name} " + " ".join(f"{v:2d}" for v in values) for name, values in sorted(attrs.items())]
    text = f"{len(attrs)}\n" + " ".join(ATTRIBUTE_NAMES) + "\n" + "".join(line + "\n" for line in lines)
    (root / "list_attr_celeba.txt").write_text(text)


def epoch_batches(cfg: Config, split: str = "train", **kw) -> list[dict]:
    return list(make_loader(cfg, split, **{"train": True, **kw}))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Round trip


def test_synthetic_round_trip(sharded):
    cfg = sharded
    partition, attrs = read_inventory(cfg)
    manifest = read_manifest(cfg)
    assert manifest["source"] == "synthetic" and manifest["synthetic"] is True
    assert manifest["dataset"]["note"].startswith("procedurally drawn faces")
    assert manifest["preprocessing"]["image_size"] == 32
    assert manifest["attributes"] == list(ATTRIBUTE_NAMES)
    manifest_file = Path(cfg.data.manifest_path)
    assert manifest_hash(cfg) == sha256(manifest_file)
    assert (manifest_file.parent / "manifest.sha256").read_text().split()[0] == manifest_hash(cfg)

    for k, split in enumerate(SPLITS):
        expected = {key for key, part in partition.items() if part == k}
        info = manifest["splits"][split]
        assert info["count"] == len(expected) == sum(s["count"] for s in info["shards"])
        for shard in info["shards"]:
            assert shard["sha256"] == sha256(Path(cfg.data.shards_dir) / shard["name"])
        batches = epoch_batches(cfg, split, train=False)
        assert len(batches) == batches_per_epoch(cfg, split, 1)
        keys = [key for b in batches for key in b["key"]]
        assert set(keys) == expected
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 3, 32, 32)
            assert b["attrs"].dtype == torch.int8 and b["attrs"].shape == (4, 40)
            for key, row in zip(b["key"], b["attrs"].tolist()):
                assert row == [int(v == 1) for v in attrs[key]]
            x = prepare_batch(b["image"], "cpu", train=True)
            assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
            assert -1.0 <= x.min() < x.max() <= 1.0


def test_synthetic_attributes_are_visible(sharded):
    """A linear probe on 16 px pixels beats the majority class: the attributes are drawn, not just labelled."""
    faces = [draw_face(random.Random(f"probe:{i}")) for i in range(480)]
    x = np.stack([preprocess(image, 148, 16).ravel() / 255.0 for image, _ in faces])
    x = np.hstack([x - x[:360].mean(0), np.ones((len(x), 1))])
    for name in ("Male", "Young", "Blond_Hair", "Black_Hair", "Pale_Skin", "Wearing_Hat"):
        y = np.array([1.0 if a[name] else -1.0 for _, a in faces])
        w = np.linalg.solve(x[:360].T @ x[:360] + 10 * np.eye(x.shape[1]), x[:360].T @ y[:360])  # ridge
        accuracy = ((x[360:] @ w > 0) == (y[360:] > 0)).mean()
        majority = max((y[360:] > 0).mean(), (y[360:] < 0).mean())
        assert accuracy >= majority + 0.05, (name, accuracy, majority)
    attrs = torch.cat([b["attrs"] for b in epoch_batches(sharded, train=False)])
    never_drawn = [i for i, n in enumerate(ATTRIBUTE_NAMES) if n not in SYNTHETIC_ATTRIBUTES]
    assert len(never_drawn) == 10 and (attrs[:, never_drawn] == 0).all()  # -1 in the table -> 0 in batches


def test_shard_twice_is_byte_identical(sharded, tmp_path):
    first = {p.name: sha256(p) for p in Path(sharded.data.shards_dir).iterdir()}
    again = sharded.with_overrides({"data.shards_dir": str(tmp_path / "again")})
    write_shards(again)
    assert {p.name: sha256(p) for p in Path(again.data.shards_dir).iterdir()} == first
    assert manifest_hash(again) == manifest_hash(sharded)


def test_png_encoding_decodes_to_the_same_pixels(sharded, tmp_path):
    png = sharded.with_overrides({"data.encoding": "png", "data.shards_dir": str(tmp_path / "png")})
    write_shards(png)
    assert read_manifest(png)["preprocessing"]["encoding"] == "png"
    raw_batches, png_batches = epoch_batches(sharded, train=False), epoch_batches(png, train=False)
    for a, b in zip(raw_batches, png_batches):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_shards_of_the_json_sidecar_format_are_refused_in_one_sentence(shard_copy):
    """Format 1 kept the attributes in <key>.json: such shards are refused before any read, with
    the command that rewrites them, never read with every attribute missing."""
    path = Path(shard_copy.data.shards_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(DataError, match=r"are format 1 and this version reads format 2 .*`dvc repro shard`"):
        make_loader(shard_copy, "train", train=True)


def test_shards_of_another_image_size_are_refused(sharded):
    with pytest.raises(DataError, match="are 32 px but data.image_size is 64.*dvc repro shard"):
        make_loader(sharded.with_overrides({"data.image_size": 64}), "train", train=True)


# ---------------------------------------------------------------------------------------------
# Ranks, workers, resumption


def test_two_ranks_two_workers_uneven_shards(sharded):
    cfg = sharded
    manifest = read_manifest(cfg)
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [10, 10, 7]
    n = manifest["splits"]["train"]["count"]
    per_rank = batches_per_epoch(cfg, "train", world_size=2)
    assert per_rank == 4  # ceil(27 / (2 * 4))
    ranks = [epoch_batches(cfg, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert [len(batches) for batches in ranks] == [per_rank, per_rank]
    seen = collections.Counter(key for batches in ranks for b in batches for key in b["key"])
    assert len(seen) == n  # every sample of the epoch ...
    padding = 2 * per_rank * 4 - n
    assert sorted(seen.values()) == [1] * (n - padding) + [2] * padding  # ... once, plus the documented wrap
    assert all(len(b["key"]) == 4 for batches in ranks for b in batches)


def test_order_is_seeded_and_independent_of_process_count(sharded):
    cfg = sharded
    keys = lambda batches: [b["key"] for b in batches]  # noqa: E731
    in_process = epoch_batches(cfg, rank=1, world_size=2, num_workers=0)
    assert keys(epoch_batches(cfg, rank=1, world_size=2, num_workers=2)) == keys(in_process)
    assert keys(epoch_batches(cfg, rank=1, world_size=2, num_workers=1)) == keys(in_process)
    assert keys(epoch_batches(cfg, rank=1, world_size=2, epoch=1, num_workers=0)) != keys(in_process)
    other_seed = cfg.with_overrides({"train.seed": 1})
    assert keys(epoch_batches(other_seed, rank=1, world_size=2, num_workers=0)) != keys(in_process)
    with pytest.raises(ValueError, match="must divide loader.num_workers"):
        make_loader(cfg.with_overrides({"loader.num_workers": 3}), "train", train=True, num_workers=2)


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_skip_batches_resumes_exactly(sharded, skip):
    full = epoch_batches(sharded, epoch=3, num_workers=2)
    resumed = epoch_batches(sharded, epoch=3, skip_batches=skip, num_workers=2)
    assert len(resumed) == len(full) - skip
    for a, b in zip(full[skip:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_train_stream_crosses_epochs_as_make_loader_defines_them(sharded):
    """Steps run on across epoch boundaries (the next epoch's workers started early) in the
    order of make_loader per epoch, from any start step."""
    per_epoch = batches_per_epoch(sharded, "train", 1)
    expected = [b["key"] for epoch in range(3) for b in epoch_batches(sharded, epoch=epoch)]
    start = per_epoch - 1  # the last batch of epoch 0
    stream = train_stream(sharded, start=start)
    got = [next(stream) for _ in range(per_epoch + 2)]
    stream.close()
    assert [step for step, _ in got] == list(range(start, start + per_epoch + 2))
    assert [b["key"] for _, b in got] == expected[start : start + per_epoch + 2]


# ---------------------------------------------------------------------------------------------
# Shared slots between loader processes and the main process


def test_slots_deliver_what_the_in_process_path_reads(sharded):
    """14 batches through 6 slots, each slot reused twice: every batch the consumer kept is
    intact and equal to the in-process reading, images channels_last."""
    in_process = epoch_batches(sharded, batch_size=2, num_workers=0)
    through_slots = epoch_batches(sharded, batch_size=2, num_workers=2)
    assert len(through_slots) == 14 > 2 * (PREFETCH * 2 + 2)
    for a, b in zip(in_process, through_slots):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["attrs"], b["attrs"])
        assert b["image"].is_contiguous(memory_format=torch.channels_last)


def test_a_batch_waits_for_its_slot_and_a_closed_ring_lets_writers_go():
    ring = BatchRing(slots=2, batch_size=2, image_size=4, attrs=3, first=5)
    batch = lambda v: ([np.full((4, 4, 3), v, np.uint8)] * 2, [np.full(3, v, np.int8)] * 2)  # noqa: E731
    assert ring.put(5, *batch(5)) and ring.put(6, *batch(6))
    third = concurrent.futures.ThreadPoolExecutor(1).submit(ring.put, 7, *batch(7))  # slot 0 again
    time.sleep(0.05)
    assert not third.done()  # batch 5 not taken yet
    images, attrs = ring.take(5, None)
    assert third.result(timeout=5) is True
    assert (images == 5).all() and (attrs == 5).all()  # the consumer's copy outlives the slot
    assert images.shape == (2, 3, 4, 4) and images.is_contiguous(memory_format=torch.channels_last)
    assert (ring.take(7, torch.device("cpu"))[0] == 7).all()
    fourth = concurrent.futures.ThreadPoolExecutor(1).submit(ring.put, 8, *batch(8))  # waits for batch 6
    ring.close()
    assert fourth.result(timeout=5) is False


def test_too_little_shared_memory_is_refused_in_words(sharded, monkeypatch):
    monkeypatch.setattr(slots, "shared_memory_free", lambda: 2**20)
    with pytest.raises(RuntimeError, match=r"needs 5 MiB of shared memory .* /dev/shm has 1 MiB free: .*--shm-size"):
        make_loader(sharded, "train", train=True, batch_size=256, num_workers=2)  # 6 slots of 256 images
    assert make_loader(sharded, "train", train=True, batch_size=256, num_workers=0)  # no slots needed
    # Training keeps three epochs' slots alive (6 slots of 4 images, ~73 KiB each): room for two is refused at once.
    monkeypatch.setattr(slots, "shared_memory_free", lambda: 160_000)
    assert make_loader(sharded, "train", train=True)
    with pytest.raises(RuntimeError, match="shared memory"):
        next(train_stream(sharded))


def test_a_loader_read_twice_gives_the_epoch_twice(sharded):
    loader = make_loader(sharded, "train", train=True, num_workers=2)
    first, second = list(loader), list(loader)
    assert len(first) == len(second) == len(loader)
    assert all(a["key"] == b["key"] and torch.equal(a["image"], b["image"]) for a, b in zip(first, second))


def test_loader_processes_wait_for_slots_and_stop_when_the_consumer_does(sharded, monkeypatch):
    """With one slot the two loader processes take turns, and a consumer that stops early
    leaves no process waiting: the loader shuts down at once, not after DataLoader's timeout."""
    monkeypatch.setattr(shard_loader, "BatchRing", lambda slots, *args, **kw: BatchRing(1, *args, **kw))
    expected = epoch_batches(sharded, batch_size=2, num_workers=0)
    for a, b in zip(expected, epoch_batches(sharded, batch_size=2, num_workers=2)):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    before = set(psutil.Process().children())
    batches = iter(make_loader(sharded, "train", train=True, batch_size=2, num_workers=2))
    next(batches)
    time.sleep(0.5)  # both processes are now waiting for the slot
    start = time.perf_counter()
    batches.close()
    assert time.perf_counter() - start < 3.0
    assert not [p for p in set(psutil.Process().children()) - before if p.is_running() and p.status() != "zombie"]


# ---------------------------------------------------------------------------------------------
# Damaged and hostile shards


def _truncate(cfg: Config, name: str, fraction: float) -> str:
    path = Path(cfg.data.shards_dir) / name
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
    return str(path)


def _garble_header(cfg: Config, name: str, member: int) -> None:
    path = Path(cfg.data.shards_dir) / name
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset
    raw = bytearray(path.read_bytes())
    raw[offset + 3] ^= 0xFF  # a flipped bit in a member name
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_fails_naming_it(shard_copy, workers):
    _truncate(shard_copy, "train-000001.tar", 0.6)
    with pytest.raises(ShardError, match=r"train-000001\.tar: unexpected end of data.*corrupt_tolerance"):
        epoch_batches(shard_copy, train=False, num_workers=workers)


def test_corrupt_header_fails_naming_the_shard(shard_copy):
    _garble_header(shard_copy, "train-000002.tar", 5)
    with pytest.raises(ShardError, match=r"train-000002\.tar: bad tar header checksum"):
        epoch_batches(shard_copy, train=False, num_workers=0)


def test_truncated_shard_is_skipped_and_counted_within_tolerance(sharded, shard_copy, caplog):
    with tarfile.open(Path(sharded.data.shards_dir) / "train-000001.tar") as tar:
        shard_keys = {m.name.split(".")[0] for m in tar}
    url = _truncate(shard_copy, "train-000001.tar", 0.6)
    cfg = shard_copy.with_overrides({"loader.corrupt_tolerance": 10})
    loader = make_loader(cfg, "train", train=False, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="dfcvae.shards.loader"):
        batches = list(loader)
    assert len(batches) == batches_per_epoch(cfg, "train", 1)
    assert all(len(b["key"]) == 4 for b in batches)
    survivors = shard_keys & {key for b in batches for key in b["key"]}
    assert 0 < len(survivors) < 10
    assert loader.skipped == 10 - len(survivors) and loader.skipped_by_shard == {url: loader.skipped}
    assert "train-000001.tar" in caplog.text and "skipp" in caplog.text
    small = shard_copy.with_overrides({"loader.corrupt_tolerance": 1})
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(make_loader(small, "train", train=False, num_workers=0))


def _flip_a_pixel_byte(cfg: Config, name: str) -> set[str]:
    """One bit of one image's pixels flipped, the tar structure intact: the shard's keys."""
    path = Path(cfg.data.shards_dir) / name
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(".npy"))
        keys = {m.name.split(".")[0] for m in tar}
    raw = bytearray(path.read_bytes())
    raw[member.offset_data + member.size - 7] ^= 0x10
    path.write_bytes(bytes(raw))
    return keys


@pytest.mark.parametrize("workers", [0, 2])
def test_a_flipped_pixel_byte_is_caught_by_the_manifests_hash_before_use(shard_copy, workers):
    checked = shard_copy.with_overrides({"loader.verify_shards": True})
    _flip_a_pixel_byte(checked, "train-000001.tar")
    message = r"train-000001\.tar: its sha256 \w+\.\.\. differs from the manifest's \w+\.\.\.: the shard was changed"
    with pytest.raises(ShardError, match=message):
        epoch_batches(checked, train=False, num_workers=workers)
    # Unchecked, the same shard decodes without a word: the check is what catches it.
    assert len(epoch_batches(shard_copy, train=False, num_workers=workers)) == batches_per_epoch(shard_copy, "train", 1)


def test_a_shard_that_fails_its_hash_is_skipped_whole_within_tolerance(shard_copy):
    checked = shard_copy.with_overrides({"loader.verify_shards": True, "loader.corrupt_tolerance": 10})
    keys = _flip_a_pixel_byte(checked, "train-000001.tar")
    loader = make_loader(checked, "train", train=False, num_workers=0)
    batches = list(loader)
    assert len(batches) == batches_per_epoch(checked, "train", 1)
    assert not keys & {key for b in batches for key in b["key"]}  # none of its samples is used
    assert loader.skipped == 10


def _samples_readable_before(shard: bytes, cut: int) -> list[str]:
    """Keys of the samples a reader can trust in the first `cut` bytes, by Python's tarfile: a
    sample is known to be whole once the next sample's first member is, or the archive is."""
    first_member_end: dict[str, int] = {}  # with the padding to the next header
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        for member in tar:
            first_member_end.setdefault(member.name.split(".")[0], member.offset_data + -(-member.size // 512) * 512)
    keys = list(first_member_end)
    if cut == len(shard):
        return keys
    return [key for key, after in zip(keys, keys[1:]) if first_member_end[after] <= cut]


def test_a_cut_shard_yields_exactly_its_whole_samples_then_fails(sharded, tmp_path):
    shard = (Path(sharded.data.shards_dir) / "train-000000.tar").read_bytes()
    count = len(_samples_readable_before(shard, len(shard)))
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        last = tar.getmembers()[-1]
    end_of_members = last.offset_data + -(-last.size // 512) * 512  # then zero blocks close the archive
    for cut in [*sorted(random.Random(0).sample(range(end_of_members), 24)), end_of_members]:
        path = tmp_path / f"cut-{cut}.tar"
        path.write_bytes(shard[:cut])
        keys = []
        with pytest.raises(ShardError, match="the shard is truncated"):
            for sample in read_segment(Segment(str(path), 0, count, count), "npy"):
                keys.append(sample["key"])
        assert keys == _samples_readable_before(shard, cut), cut


@pytest.mark.parametrize("field", [slice(124, 136), slice(148, 156)])  # size, checksum
def test_a_header_field_that_is_not_a_number_is_a_checksum_error(sharded, tmp_path, field):
    shard = bytearray((Path(sharded.data.shards_dir) / "train-000000.tar").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(shard))) as tar:
        fourth = tar.getmembers()[3].offset  # the second sample's sidecar
    shard[fourth + field.start : fourth + field.stop] = b"zz" * ((field.stop - field.start) // 2)
    names = []
    with pytest.raises(ValueError, match="^bad tar header checksum: the shard is corrupt$"):
        for name, *_ in tar_members(io.BytesIO(bytes(shard))):
            names.append(name)
    with tarfile.open(Path(sharded.data.shards_dir) / "train-000000.tar") as tar:
        assert names == [m.name for m in tar.getmembers()[:3]]


def test_a_negative_size_with_a_valid_checksum_is_refused_not_walked(sharded):
    shard = bytearray((Path(sharded.data.shards_dir) / "train-000000.tar").read_bytes())
    header = shard[:512]  # the first member's
    header[124:136] = b"-0000001000\0"  # int(..., 8) takes it: -512 would walk back onto this header
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    shard[:512] = header
    with pytest.raises(ValueError, match="is not a number"):
        list(tar_members(io.BytesIO(bytes(shard))))


class _CountingReader(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.bytes_read = 0

    def read(self, size=-1):
        out = super().read(size)
        self.bytes_read += len(out)
        return out


def test_a_segment_that_ends_early_stops_reading_its_shard(sharded, monkeypatch):
    path = Path(sharded.data.shards_dir) / "train-000000.tar"
    stream = _CountingReader(path.read_bytes())
    monkeypatch.setattr(tar_walker, "READ_BYTES", 4096)
    monkeypatch.setattr(shard_loader, "open_url", lambda url: stream)
    keys = [s["key"] for s in read_segment(Segment(str(path), 1, 3, 10), "npy")]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert keys == [m.name.split(".")[0] for m in members[2:6:2]]
    # up to sample 3's first member, which says sample 2 is whole, and one read more; not the shard
    assert stream.bytes_read <= members[6].offset_data + members[6].size + 4096 < path.stat().st_size / 2


def test_a_pipe_that_fails_midway_delivers_the_samples_it_sent(sharded, monkeypatch):
    path = Path(sharded.data.shards_dir) / "train-000000.tar"
    half = path.stat().st_size // 2
    monkeypatch.setattr(tar_walker, "READ_BYTES", 2048)
    url = f"pipe:sh -c 'head -c {half} {path}; sleep 0.3; exit 3'"
    keys = []
    with pytest.raises(ShardError, match="exit 3"):
        for sample in read_segment(Segment(url, 0, 10, 10), "npy"):
            keys.append(sample["key"])
    with tarfile.open(path) as tar:
        in_order = list(dict.fromkeys(m.name.split(".")[0] for m in tar))
    assert keys and keys == in_order[: len(keys)] and len(keys) < 10


def test_attributes_round_trip_as_40_bytes_and_anything_else_is_refused():
    rng = random.Random(0)
    attrs = [rng.randint(0, 1) for _ in ATTRIBUTE_NAMES]
    assert len(encode_attrs(attrs)) == len(ATTRIBUTE_NAMES)
    assert decode_attrs(encode_attrs(attrs)).tolist() == attrs
    assert decode_attrs(encode_attrs(None)).tolist() == [-1] * len(ATTRIBUTE_NAMES)  # unknown
    for bad in (encode_attrs(attrs)[:-1], encode_attrs(attrs) + b"\0", bytes([2]) * len(ATTRIBUTE_NAMES)):
        with pytest.raises(ValueError, match=r"\.attrs holds"):
            decode_attrs(bad)


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_loaded(shard_copy, tmp_path):
    sentinel = tmp_path / "pickle-ran"
    payload = pickle.dumps(_Payload(sentinel))
    path = Path(shard_copy.data.shards_dir) / "train-000000.tar"
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member))
            if member.name.endswith(".attrs"):
                for ext in ("pyd", "pth", "pickle"):
                    info = tarfile.TarInfo(member.name.replace(".attrs", f".{ext}"))
                    info.size = len(payload)
                    dst.addfile(info, io.BytesIO(payload))
    path.write_bytes(out.getvalue())
    batches = epoch_batches(shard_copy, train=False, num_workers=0)
    assert len(batches) == batches_per_epoch(shard_copy, "train", 1)
    assert not sentinel.exists()
    pickle.loads(payload)  # the payload is live: loading it would have left the file
    assert sentinel.exists()


# ---------------------------------------------------------------------------------------------
# Bad raw images (data.source: folder)


def _face(size=(178, 218), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


BAD_IMAGES = {  # relative path -> (make the file bytes, outcome, a substring of the reported reason)
    "good/a.jpg": (lambda: _jpeg(_face(seed=1)), "written", ""),
    "good/b.JPEG": (lambda: _jpeg(_face(seed=2)), "written", ""),
    "good/c.png": (lambda: _png(_face(seed=3)), "written", ""),
    "good/d.jpg": (lambda: _jpeg(_face(seed=4)), "written", ""),
    "bad/truncated.jpg": (lambda: _jpeg(_face(seed=5))[:3000], "rejected", "truncated or corrupt"),
    "bad/text.jpg": (lambda: b"this is not an image\n" * 10, "rejected", "not an image"),
    "bad/gray.png": (lambda: _png(_face(seed=6).convert("L")), "converted", "L -> RGB"),
    "bad/rgba_opaque.png": (lambda: _png(_face(seed=7).convert("RGBA")), "converted", "RGBA -> RGB (alpha fully"),
    "bad/rgba_transparent.png": (
        lambda: _png(Image.merge("RGBA", (*_face(seed=8).split(), Image.new("L", (178, 218), 128)))),
        "rejected",
        "transparent pixels",
    ),
    "bad/cmyk.jpg": (lambda: _jpeg(_face(seed=9).convert("CMYK")), "converted", "CMYK -> RGB"),
    "bad/tiny.png": (lambda: _png(_face(size=(1, 1))), "rejected", "too small: 1x1"),
    "bad/huge.png": (lambda: _png(_face(size=(400, 400))), "rejected", "too large: 400x400"),
    "bad/sixteen_bit.png": (lambda: _png(Image.new("I;16", (178, 218), 1000)), "converted", "I;16 (16-bit) -> 8-bit"),
    "bad/float.tif": (lambda: _tiff(Image.new("F", (178, 218), 0.5)), "rejected", "unsupported pixel mode F"),
    # Pixels fine, EXIF block not TIFF: written, the metadata ignored.
    "bad/broken_exif.png": (
        lambda: _png_with_exif(_face(seed=10), b"Exif\x00\x00not-tiff"),
        "converted",
        "EXIF unreadable (SyntaxError",
    ),
}
# Not images: hidden files, macOS's AppleDouble twins and __MACOSX/ are left out, never rejected.
METADATA_FILES = ("good/._a.jpg", "good/.DS_Store.png", "__MACOSX/good/._b.JPEG", ".thumbs/c.png")


def _tiff(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="TIFF")
    return out.getvalue()


def _png_with_exif(img: Image.Image, exif: bytes) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", exif=exif)
    return out.getvalue()


def _folder_config(tmp_path: Path, **overrides) -> Config:
    folder = tmp_path / "images"
    for rel, (make, _, _) in BAD_IMAGES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(make())
    (folder / "notes.txt").write_text("not an image: skipped, with its reason")
    for rel in METADATA_FILES:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"\x00\x05\x16\x07AppleDouble metadata, not an image")
    return make_config(
        tmp_path,
        {
            "data.source": "folder",
            "data.folder_dir": str(folder),
            "data.max_image_pixels": 200 * 250,
            "data.split_fractions": [0.6, 0.2, 0.2],
            **overrides,
        },
    )


def test_bad_raw_images_are_converted_or_rejected_with_reasons(tmp_path):
    cfg = _folder_config(tmp_path, **{"data.max_reject_fraction": 0.5})
    info = fetch(cfg)
    assert info["source"] == "folder" and info["count"] == len(BAD_IMAGES)
    source = {r.path for r in rows(read_table(Path(cfg.data.inventory_dir)))}  # the user's own paths
    manifest = write_shards(cfg)
    report = json.loads((Path(cfg.data.shards_dir) / "report.json").read_text())
    outcome = {source_file: ("written", "") for source_file in source}
    for kind in ("converted", "rejected"):
        for entry in report[kind]:
            assert entry["file"] in source  # every entry names the user's own file
            outcome[entry["file"]] = (kind, entry["reason"])
    for rel, (_, expected, reason) in BAD_IMAGES.items():
        assert outcome[rel][0] == expected, rel
        assert reason in outcome[rel][1], (rel, outcome[rel])
    counts = report["counts"]
    assert counts == manifest["raw"]
    assert counts["in"] == len(BAD_IMAGES) == counts["written"] + counts["rejected"]
    assert counts["converted"] == sum(v[1] == "converted" for v in BAD_IMAGES.values())
    assert counts["written"] == sum(manifest["splits"][s]["count"] for s in SPLITS)
    assert manifest["source"] == "folder" and manifest["synthetic"] is False and manifest["attributes"] == []
    assert manifest["dataset"]["split"] == "hash" and not set(METADATA_FILES) & set(source)
    skipped = {entry["file"]: entry["reason"] for entry in report["fetch"]["skipped"]}
    assert skipped["notes.txt"] == "not an image type read here (.txt)"
    assert skipped["good/._a.jpg"] == skipped["good/.DS_Store.png"] == "a hidden or macOS metadata file"
    assert skipped["__MACOSX"] == skipped[".thumbs"] == "a hidden or macOS metadata folder: not read"
    batch = next(iter(make_loader(cfg, "train", train=False, num_workers=0)))
    assert (batch["attrs"] == -1).all()  # folder data has no attributes


def test_too_many_rejects_fail_the_stage_after_writing_the_report(tmp_path):
    cfg = _folder_config(tmp_path, **{"data.max_reject_fraction": 0.2})
    fetch(cfg)
    with pytest.raises(DataError, match=r"6 of 15 images were rejected.*shards\.partial/report\.json"):
        write_shards(cfg)
    assert len(json.loads((Path(cfg.data.shards_dir + ".partial") / "report.json").read_text())["rejected"]) == 6


def test_a_folder_already_split_keeps_its_split_and_the_manifest_says_so(tmp_path):
    folder = tmp_path / "images"
    layout = {"train": 6, "valid": 2, "test": 3}
    for split, n in layout.items():
        (folder / split / "cats").mkdir(parents=True)
        for i in range(n):
            (folder / split / "cats" / f"{i}.png").write_bytes(_png(_face(seed=i)))
    cfg = make_config(tmp_path, {"data.source": "folder", "data.folder_dir": str(folder)})
    info = fetch(cfg)
    assert info["split"] == "folders" and info["counts"] == {"train": 6, "val": 2, "test": 3}
    for row in rows(read_table(Path(cfg.data.inventory_dir))):  # every test image stays in test, and so on
        assert row.split == {"train": 0, "valid": 1, "test": 2}[row.path.split("/")[0]]
    assert write_shards(cfg)["dataset"]["split"] == "folders"


def test_a_pixel_crop_of_large_photos_is_warned_about_and_auto_keeps_the_centre_square(tmp_path, capfd):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):  # 600x400 photographs: a 148 px crop keeps 9% of each
        (folder / f"{i}.jpg").write_bytes(_jpeg(_face(size=(600, 400), seed=i)))
    (folder / "small.png").write_bytes(_png(_face(size=(40, 30))))  # under data.image_size: never upscaled
    cfg = make_config(
        tmp_path,
        {
            "data.source": "folder",
            "data.folder_dir": str(folder),
            "data.crop_size": 148,
            "data.split_fractions": [0.34, 0.33, 0.33],
            "data.max_reject_fraction": 0.5,
        },
    )
    fetch(cfg)
    manifest = write_shards(cfg)
    assert manifest["preprocessing"]["crop"] == "148 px"
    assert manifest["preprocessing"]["images_with_crop_under_quarter_area"] == 6
    assert (
        "data.crop_size=148 keeps under 25% of the area of 6 of 7 images (as little as 9.1%)" in capfd.readouterr().err
    )
    square = cfg.with_overrides({"data.crop_size": "auto", "data.shards_dir": str(tmp_path / "square")})
    manifest = write_shards(square)
    assert manifest["preprocessing"]["crop"] == "square"
    assert manifest["preprocessing"]["images_with_crop_under_quarter_area"] == 0 and manifest["raw"]["rejected"] == 1
    report = json.loads((Path(square.data.shards_dir) / "report.json").read_text())
    assert report["rejected"][0]["reason"] == "too small: 40x30 is under data.image_size=32"
    assert "WARNING" not in capfd.readouterr().err
    # The centre square of the shorter side, resized: a 600x400 image keeps its middle 400x400.
    img = Image.open(folder / "0.jpg").convert("RGB")
    expected = np.asarray(img.crop((100, 0, 500, 400)).resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=None))
    assert np.array_equal(preprocess(img, "square", 32), expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"data.split_fractions": [0.9, 0.0, 0.1]},
            r"data.synthetic_count=33 with data.split_fractions=\[0.9, 0.0, 0.1\] gives train 30, val 0, "
            r"test 3 images: val is empty; .*add images or change data.split_fractions",
        ),
        (
            {"data.source": "folder"},
            r"3 images in .* gives train \d, val \d, test \d images: \w+( and \w+)? (is|are) empty",
        ),
    ],
)
def test_an_empty_split_is_refused_at_fetch_with_the_numbers(tmp_path, overrides, message):
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(_face(seed=i)))
    cfg = make_config(tmp_path, {"data.folder_dir": str(folder), **overrides})
    with pytest.raises(DataError, match=message):
        fetch(cfg)


# ---------------------------------------------------------------------------------------------
# data.source: celeba


def test_celeba_missing_without_download_says_where_to_put_files(tmp_path):
    cfg = make_config(
        tmp_path, {"data.source": "celeba", "data.celeba_dir": str(tmp_path / "celeba"), "data.download": False}
    )
    with pytest.raises(DataError) as e:
        fetch(cfg)
    message = str(e.value)
    for needed in (
        str(tmp_path / "celeba"),
        "img_align_celeba/",
        "img_align_celeba.zip",
        "list_eval_partition.txt",
        "list_attr_celeba.txt",
        ".csv",
        "data.download",
    ):
        assert needed in message


def test_celeba_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    import torchvision.datasets.celeba as tv_celeba

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(tv_celeba, "download_file_from_google_drive", no_network)
    cfg = make_config(
        tmp_path, {"data.source": "celeba", "data.celeba_dir": str(tmp_path / "celeba"), "data.download": True}
    )
    with pytest.raises(DataError, match=r"download failed \(ConnectionError.*put img_align_celeba/.*list_attr_celeba"):
        fetch(cfg)


def _celeba_lookalike(root: Path, layout: str) -> dict[str, list[int]]:
    """Six CelebA-named images and tables: 4 train, 1 val, 1 test, in one of the common layouts."""
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    partition = dict(zip(names, [0, 0, 0, 0, 1, 2]))
    attrs = {n: [int(v) for v in rng.choice([-1, 1], size=40)] for n in names}
    images = {n: _jpeg(_face(seed=i)) for i, n in enumerate(names)}
    if layout == "official-txt":
        (root / "img_align_celeba").mkdir(parents=True)
        for n, b in images.items():
            (root / "img_align_celeba" / n).write_bytes(b)
        write_partition(root, partition)
        write_attrs(root, attrs)
        (root / "identity_CelebA.txt").write_text("".join(f"{n} {i + 100}\n" for i, n in enumerate(names)))
    elif layout == "kaggle-csv":
        nested = root / "img_align_celeba" / "img_align_celeba"
        nested.mkdir(parents=True)
        for n, b in images.items():
            (nested / n).write_bytes(b)
        with open(root / "list_eval_partition.csv", "w", newline="") as f:
            csv.writer(f).writerows([["image_id", "partition"], *partition.items()])
        with open(root / "list_attr_celeba.csv", "w", newline="") as f:
            csv.writer(f).writerows([["image_id", *ATTRIBUTE_NAMES], *([n, *v] for n, v in attrs.items())])
    else:  # drive-zip: the Google Drive folders, images zipped
        for sub in ("Img", "Anno", "Eval"):
            (root / sub).mkdir(parents=True)
        with zipfile.ZipFile(root / "Img" / "img_align_celeba.zip", "w") as z:
            for n, b in images.items():
                z.writestr(f"img_align_celeba/{n}", b)
        write_partition(root / "Eval", partition)
        write_attrs(root / "Anno", attrs)
    return attrs


def _lookalike_config(tmp_path: Path) -> Config:
    """Fetch from tmp_path/celeba, where _celeba_lookalike put its 4/1/1 images, without downloading."""
    return make_config(
        tmp_path,
        {
            "data.source": "celeba",
            "data.celeba_dir": str(tmp_path / "celeba"),
            "data.download": False,
            "data.celeba_counts": [4, 1, 1],
        },
    )


@pytest.mark.parametrize("layout", ["official-txt", "kaggle-csv", "drive-zip"])
def test_celeba_layouts(tmp_path, layout):
    attrs = _celeba_lookalike(tmp_path / "celeba", layout)
    cfg = _lookalike_config(tmp_path)
    info = fetch(cfg)
    assert info["source"] == "celeba" and info["counts"] == {"train": 4, "val": 1, "test": 1}
    assert info["read_from"]["images"].endswith("img_align_celeba.zip" if layout == "drive-zip" else "img_align_celeba")
    partition, raw_attrs = read_inventory(cfg)
    assert raw_attrs == {Path(n).stem: [int(v == 1) for v in a] for n, a in attrs.items()}
    assert sorted(p.name for p in Path(cfg.data.inventory_dir).iterdir()) == [
        ".dfcvae-output",
        "dataset.json",
        "images.parquet",
    ]
    assert inputs_changed(cfg) is None
    if layout == "official-txt":  # a table edited after fetch: the retrain check sees it
        (tmp_path / "celeba" / "identity_CelebA.txt").write_text("000001.jpg 7\n")
        assert "identity_CelebA.txt" in inputs_changed(cfg) and "changed since the last fetch" in inputs_changed(cfg)
    identities = [r.identity for r in rows(read_table(Path(cfg.data.inventory_dir)))]
    assert identities == ([i + 100 for i in range(6)] if layout == "official-txt" else [None] * 6)
    manifest = write_shards(cfg)
    assert manifest["source"] == "celeba" and manifest["synthetic"] is False
    keys, attr_rows = [], []
    for split in SPLITS:
        for b in make_loader(cfg, split, train=False, batch_size=1, num_workers=0):
            keys += b["key"]
            attr_rows += b["attrs"].tolist()
    assert sorted(keys) == sorted(partition)
    for key, row in zip(keys, attr_rows):
        assert row == raw_attrs[key]


@pytest.mark.parametrize(
    "content, says",
    [
        (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title>", "an HTML page"),
        (b"PK\x03\x04" + b"\x00" * 100, "not a readable zip"),
    ],
)
def test_a_celeba_zip_that_is_not_a_zip_gets_the_fetch_advice(tmp_path, content, says):
    _celeba_lookalike(tmp_path / "celeba", "drive-zip")
    (tmp_path / "celeba" / "Img" / "img_align_celeba.zip").write_bytes(content)
    cfg = _lookalike_config(tmp_path)
    with pytest.raises(
        DataError,
        match=rf"img_align_celeba.zip \(\d+ bytes\) is {says}.*delete it and put "
        r"img_align_celeba/ \(or img_align_celeba.zip\)",
    ):
        fetch(cfg)


def test_celeba_with_wrong_counts_is_refused(tmp_path):
    _celeba_lookalike(tmp_path / "celeba", "official-txt")
    cfg = make_config(
        tmp_path, {"data.source": "celeba", "data.celeba_dir": str(tmp_path / "celeba"), "data.download": False}
    )
    with pytest.raises(DataError, match=r"lists \(4, 1, 1\) train/val/test images, not \(162770, 19867, 19962\)"):
        fetch(cfg)


# ---------------------------------------------------------------------------------------------
# URLs, the device step


def test_pipe_and_fsspec_urls_read_the_same_batches(sharded):
    local = [b["key"] for b in epoch_batches(sharded, num_workers=2)]
    shards = sharded.data.shards_dir
    piped = sharded.with_overrides({"loader.shard_url": f"pipe:cat {shards}/{{name}}"})
    assert [b["key"] for b in epoch_batches(piped, num_workers=2)] == local
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(shards, "/shards", recursive=True)
    # fsspec's memory filesystem hands every reader the same file object: one stream at a time
    one_stream = sharded.with_overrides({"loader.num_workers": 1})
    remote = one_stream.with_overrides({"data.shards_dir": "memory://shards"})
    assert manifest_hash(remote) == manifest_hash(sharded)
    assert [b["key"] for b in epoch_batches(remote, num_workers=0)] == [b["key"] for b in epoch_batches(one_stream)]


def test_prepare_batch_scales_and_flips_only_when_training():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    expected = images.float() / 127.5 - 1
    x = prepare_batch(images, "cpu", train=False)
    assert torch.allclose(x, expected) and x.is_contiguous(memory_format=torch.channels_last)
    y = prepare_batch(images, "cpu", train=True, generator=torch.Generator().manual_seed(0))
    flipped = [not torch.allclose(y[i], expected[i]) for i in range(32)]
    for i in range(32):
        assert torch.allclose(y[i], expected[i].flip(2) if flipped[i] else expected[i])
    assert 0 < sum(flipped) < 32


# ---------------------------------------------------------------------------------------------
# DVC


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_repro_shard_in_a_fresh_repo(tmp_path):
    repo = tmp_path / "repo"
    for package in ("pipeline", "dfcvae"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml_params(
        ROOT / "params.yaml", {"source": "synthetic", "synthetic_count": 40, "image_size": 32, "samples_per_shard": 16}
    )
    (repo / "params.yaml").write_text(params)
    env_bin = str(Path(sys.executable).parent)

    def run(*cmd: str) -> str:
        result = subprocess.run(
            cmd,
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=240,
            env={
                "PATH": f"{env_bin}:/usr/bin:/bin",
                "HOME": str(tmp_path),
                "PYTHONPATH": str(repo),
                "DVC_NO_ANALYTICS": "1",
            },
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    out = run("dvc", "repro", "shard")
    assert "Running stage 'fetch'" in out and "Running stage 'shard'" in out
    manifest = json.loads((repo / "data" / "shards" / "manifest.json").read_text())
    assert manifest["synthetic"] is True and manifest["splits"]["train"]["count"] == 32
    lock = (repo / "dvc.lock").read_text()
    assert "data.image_size: 32" in lock
    (repo / "params.yaml").write_text(params.replace("image_size: 32", "image_size: 16"))
    out = run("dvc", "repro", "shard")
    assert "Running stage 'fetch'" not in out and "Running stage 'shard'" in out


def yaml_params(path: Path, data_overrides: dict) -> str:
    import yaml

    params = yaml.safe_load(path.read_text())
    params["data"].update(data_overrides)
    return yaml.safe_dump(params, sort_keys=False)


# ---------------------------------------------------------------- webdataset interoperability


def _ours(cfg: Config, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> ((H, W, 3) uint8 image, (40,) attributes) of every sample of `split`, by our loader."""
    samples = {}
    for batch in make_loader(cfg, split, train=False, batch_size=4, num_workers=0):
        for key, image, attrs in zip(batch["key"], batch["image"], batch["attrs"]):
            samples[key] = (image.permute(1, 2, 0).numpy(), attrs.numpy())
    return samples


def _shard_paths(cfg: Config, split: str) -> list[Path]:
    manifest = read_manifest(cfg)
    return [Path(cfg.data.shards_dir) / shard["name"] for shard in manifest["splits"][split]["shards"]]


def test_webdataset_reads_every_sample_of_our_shards(sharded):
    """Our shards are plain webdataset shards: its own pipeline finds every sample, keyed as ours,
    with the same pixels and attributes (members read as bytes: nothing of ours is unpickled)."""
    import webdataset as wds

    for split in SPLITS:
        ours = _ours(sharded, split)
        seen = {}
        for sample in wds.WebDataset([str(p) for p in _shard_paths(sharded, split)], shardshuffle=False):
            assert set(sample) >= {"__key__", "npy", "attrs"}
            image = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            attrs = np.frombuffer(sample["attrs"], np.int8)
            seen[sample["__key__"]] = (image, attrs)
        assert len(seen) == read_manifest(sharded)["splits"][split]["count"]
        assert set(seen) == set(ours)
        for key, (image, attrs) in seen.items():
            assert image.dtype == np.uint8 and np.array_equal(image, ours[key][0])
            assert np.array_equal(np.asarray(attrs), ours[key][1])


def test_our_loader_reads_shards_written_by_webdatasets_tarwriter(sharded, tmp_path):
    """Shards written by webdataset's TarWriter with our member names (<key>.npy, <key>.attrs)
    load through make_loader to the same samples."""
    import webdataset as wds

    out = tmp_path / "shards"
    shutil.copytree(sharded.data.shards_dir, out)
    rewritten = sharded.with_overrides({"data.shards_dir": str(out)})
    manifest = json.loads((out / "manifest.json").read_text())
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = out / shard["name"]
            members = list(wds.WebDataset(str(path), shardshuffle=False))
            path.unlink()
            with wds.TarWriter(str(path)) as sink:
                for sample in members:
                    sink.write({"__key__": sample["__key__"], "npy": sample["npy"], "attrs": sample["attrs"]})
            shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (out / "manifest.json").write_text(text)
    (out / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
    for split in SPLITS:
        theirs, ours = _ours(rewritten, split), _ours(sharded, split)
        assert set(theirs) == set(ours)
        assert all(np.array_equal(theirs[k][0], ours[k][0]) and np.array_equal(theirs[k][1], ours[k][1]) for k in ours)


@pytest.mark.parametrize("piece", [512, 1536, 4 << 20])
def test_pax_named_members_read_the_same_whatever_the_read_size(sharded, tmp_path, monkeypatch, piece):
    """A pax record and its member may fall on either side of a read: the walk resumes at the record."""
    import webdataset as wds

    path = tmp_path / "theirs.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:06d}", "npy": bytes([i]) * (700 + i), "attrs": b"\0" * 40})
    monkeypatch.setattr(tar_walker, "READ_BYTES", piece)
    with path.open("rb") as stream:
        members = [(name, bytes(buf[at : at + size])) for name, buf, at, size in tar_members(stream)]
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert members == expected and len(members) == 10


def test_the_40_attribute_probe_on_celeba_layout_data_counts_every_labelled_attribute(tmp_path):
    """On CelebA's layout every one of the 40 attributes has ground truth: none is left out for
    lack of it (only for lack of a class among the 4 train images)."""
    from dfcvae.evaluate import ground_truth, probe_latents, read_split

    _celeba_lookalike(tmp_path / "celeba", "official-txt")
    cfg = _lookalike_config(tmp_path)
    fetch(cfg)
    write_shards(cfg)
    assert ground_truth(cfg) == set(ATTRIBUTE_NAMES)
    sizes = {"train": 4, "test": 1}
    latents = {split: torch.randn(n, 8, generator=torch.Generator().manual_seed(n)) for split, n in sizes.items()}
    train, test = ((latents[s], read_split(cfg, s, 10)[1]) for s in ("train", "test"))
    probe = probe_latents(train, test, ["all"], ground_truth(cfg))
    assert set(probe["attributes"]) | set(probe["skipped"]) == set(ATTRIBUTE_NAMES)
    assert all(why.startswith("only class") for why in probe["skipped"].values()), probe["skipped"]
    assert len(probe["attributes"]) >= 20


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_and_dotted_member_names_read_as_tarfile_and_webdataset_name_them(tmp_path, monkeypatch, fmt):
    """Names over 100 characters (pax path records, GNU long names, the ustar prefix field) and
    dotted folders: the walk finds tarfile's names, and keys split as webdataset splits them."""
    folder = "shards.v2/" + "d" * (90 if fmt == tarfile.USTAR_FORMAT else 120)
    names = [f"{folder}/{i:06d}.{ext}" for i in range(3) for ext in ("npy", "attrs")]
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for n, name in enumerate(names):
            add_member(tar, name, bytes([n]) * (600 + n))
    monkeypatch.setattr(tar_walker, "READ_BYTES", 1024)  # records and their members fall across reads
    with path.open("rb") as stream:
        found = [(name, bytes(buf[at : at + size])) for name, buf, at, size in tar_members(stream)]
    with tarfile.open(path) as tar:
        assert found == [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = f"{folder}/000000"
    assert [split_member(name) for name, _ in found[:2]] == [(key, "npy"), (key, "attrs")]


def test_a_member_name_repeated_within_a_sample_is_damage(sharded, tmp_path):
    """As webdataset's group_by_keys treats it: two images for one key are never silently one."""
    path = tmp_path / "twice.tar"
    image = (Path(sharded.data.shards_dir) / "train-000000.tar").read_bytes()[512 : 512 + 16]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("000001.npy", "000001.attrs", "000001.npy", "000002.npy", "000002.attrs"):
            add_member(tar, name, image)
    with pytest.raises(ShardError, match=r"twice\.tar: member 000001\.npy appears twice in sample 000001"):
        list(read_segment(Segment(str(path), 0, 2, 2), "npy"))


def test_a_malformed_pax_record_is_damage_not_a_hang():
    for body in (b"20 path=abc/def.npy\nX", b"99 path=x\n", b"5 a\n"):
        with pytest.raises(ValueError, match="malformed pax header"):
            tar_walker._pax_records(body)
