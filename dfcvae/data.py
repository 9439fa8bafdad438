"""The shard format, in one home: writing samples, the tar reader, the epoch plan, the loader.

Shard format, written through `encode_image`, `encode_meta` and `add_member` (by
`pipeline/shard.py`) and read only here; plain webdataset shards, read by webdataset's own
`WebDataset` as by this reader (tests/test_data.py). This reader is kept because it reads about
5 times the images per CPU-second of webdataset's `WebDataset(...).decode()` pipeline on the same
shards (docs/data.md, `python -m bench.reader`); the batch slots are dfcvae/ring.py.

    <split>-NNNNNN.tar          split in SPLITS, a fixed number of samples each
        <key>.npy | <key>.png   the (H, W, 3) uint8 image: data.encoding raw | png
        <key>.json              {"attrs": [40 x 0/1], "identity": int}; either may be absent
    manifest.json               per-split counts, per-shard name/count/sha256, preprocessing, source
    manifest.sha256             sha256 of manifest.json (`manifest_hash`)

Batches are dicts:
    image  uint8 (B, 3, H, W), channels_last in memory, on make_loader's `device` (else the host);
           `prepare_batch` makes floats on the device
    attrs  int8 (B, 40) in ATTRIBUTE_NAMES order: 1 present, 0 absent, -1 unknown (no attribute
           data, e.g. data.source: folder)
    key    list[str], the image ids

Epoch order. Every rank yields exactly `batches_per_epoch` full batches, so DDP steps stay in
lockstep. The epoch is a sequence of T = batches * world_size * batch_size positions over the
concatenated shards (shard order shuffled by (train.seed, epoch) when train; fixed otherwise);
position p reads sample p mod N. So every sample is seen once per epoch and the T - N positions
past the end wrap round to the start: that many samples are seen twice (at most
world_size * batch_size - 1, the same padding DistributedSampler uses). Rank r reads the
contiguous range [r T/ws, (r+1) T/ws). Within a rank, batch j comes from stream j mod V,
V = loader.num_workers; each stream reads a contiguous part of the rank's range through its own
shuffle buffer (train only). The order is therefore a function of (train.seed, epoch, rank,
world_size, batch_size, loader.num_workers, loader.shuffle_buffer) and not of how many
DataLoader processes run the streams (any divisor of V), so `skip_batches=k` resumes exactly at
batch k.

Safety: members are decoded by extension, only .npy (allow_pickle=False), .png and .json; any
other member (a .pyd or .pth pickle, say) is never read. A truncated or corrupt shard raises
ShardError naming it, unless loader.corrupt_tolerance allows skipping: then the skipped samples
are logged, counted in `ShardLoader.skipped`, and replaced by repeats of the stream's recent
samples so the batch count still holds. With loader.verify_shards (the default), each process
checks a shard's bytes against the manifest's sha256 the first time it reads it, before using
any sample of it: a changed byte makes the whole shard corrupt, never a silently wrong image.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import logging
import math
import random
import re
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dfcvae.config import Config, UserError
from dfcvae.ring import BatchRing

log = logging.getLogger(__name__)

# CelebA's list_attr_celeba.txt columns, in the official order.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")  # partition 0, 1, 2 in list_eval_partition.txt
IMAGE_MEMBERS = {"raw": "npy", "png": "png"}  # data.encoding -> tar member extension
META_MEMBER = "json"
FORMAT_VERSION = 1
PREFETCH = 2  # batches each DataLoader process reads ahead
PNG_COMPRESS_LEVEL = 6  # fixed, so PNG shards are byte-identical on reruns


class DataError(UserError, RuntimeError):
    """A data problem, phrased so the user knows what to fix."""


MIN_SPLIT_IMAGES = 1  # an empty split fails late: training's validation, every tuning trial, evaluation


def check_split_counts(counts: dict[str, int], what: str) -> None:
    """DataError naming the splits with fewer than MIN_SPLIT_IMAGES images, with the numbers."""
    short = [split for split, n in counts.items() if n < MIN_SPLIT_IMAGES]
    if short:
        raise DataError(
            f"{what} gives {', '.join(f'{s} {n}' for s, n in counts.items())} images: {' and '.join(short)} "
            f"{'is' if len(short) == 1 else 'are'} empty; training validates on val and evaluation measures on "
            "test, so every split needs images: add images or change data.split_fractions."
        )


class ShardError(DataError):
    """A shard that cannot be read; the message names the shard."""


# ---------------------------------------------------------------- writing samples (pipeline/shard.py)


def encode_image(image: np.ndarray, encoding: str) -> tuple[str, bytes]:
    """(H, W, 3) uint8 -> (member extension, bytes) for data.encoding raw | png."""
    out = io.BytesIO()
    if encoding == "raw":
        np.lib.format.write_array(out, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    else:
        Image.fromarray(image, "RGB").save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return IMAGE_MEMBERS[encoding], out.getvalue()


def encode_meta(attrs: list[int] | None, identity: int | None) -> bytes:
    """The sidecar: {"attrs": 40 x 0/1, "identity": int}, each only when known."""
    meta = {"attrs": attrs, "identity": identity}
    return json.dumps({k: v for k, v in meta.items() if v is not None}, sort_keys=True, separators=(",", ":")).encode()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed metadata (mtime 0, mode 644, no owner): byte-identical shards on reruns."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- reading samples


def decode_image(ext: str, data: bytes, size: int) -> np.ndarray:
    """Member bytes -> (size, size, 3) uint8; only the two encodings we write, never pickle."""
    if ext == "npy":
        header = _npy_header(size)
        if data.startswith(header) and len(data) == len(header) + size * size * 3:  # the header we write
            image = np.frombuffer(data, np.uint8, offset=len(header)).reshape(size, size, 3)
        else:
            image = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    elif ext == "png":
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.mode != "RGB":
                raise ValueError(f"PNG mode {img.mode}, expected RGB")
            image = np.asarray(img)
    else:
        raise ValueError(f"unexpected image member .{ext}")
    if image.dtype != np.uint8 or image.shape != (size, size, 3):
        raise ValueError(f"image is {image.dtype} {image.shape}, the manifest says uint8 {(size, size, 3)}")
    return image


@functools.lru_cache(maxsize=4)
def _npy_header(size: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, np.zeros((size, size, 3), np.uint8), allow_pickle=False)
    return out.getvalue()[: -size * size * 3]


def decode_attrs(data: bytes) -> np.ndarray:
    """Sidecar JSON -> int8 (40,), 1/0, or all -1 when the sample has no attribute data."""
    written = _attrs_as_written(data)
    if written is not None:
        return written
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ValueError("sidecar is not a JSON object")
    attrs = meta.get("attrs")
    if attrs is None:
        return np.full(len(ATTRIBUTE_NAMES), -1, dtype=np.int8)
    if not isinstance(attrs, list) or len(attrs) != len(ATTRIBUTE_NAMES) or not set(attrs) <= {0, 1}:
        raise ValueError(f"attrs must be {len(ATTRIBUTE_NAMES)} values in {{0, 1}}")
    return np.asarray(attrs, dtype=np.int8)


_ATTRS_PREFIX = b'{"attrs":['  # how encode_meta starts a sidecar with attributes
_ATTRS_END = len(_ATTRS_PREFIX) + 2 * len(ATTRIBUTE_NAMES) - 1  # the 40 comma-separated 0/1 end here
_ATTRS_COMMAS = b"," * (len(ATTRIBUTE_NAMES) - 1)
_SIDECAR_TAIL = re.compile(rb'\](,"identity":(0|[1-9][0-9]*))?\}')  # what may follow them


def _attrs_as_written(data: bytes) -> np.ndarray | None:
    """The attributes of a sidecar exactly as encode_meta writes it, read without a JSON parse
    (which costs several times a raw image's decode); None for any other text."""
    if not data.startswith(_ATTRS_PREFIX):
        return None
    values, tail = data[len(_ATTRS_PREFIX) : _ATTRS_END], data[_ATTRS_END:]
    if values[1::2] != _ATTRS_COMMAS or values[::2].translate(None, b"01"):
        return None
    if not _SIDECAR_TAIL.fullmatch(tail):
        return None
    return np.frombuffer(values[::2], np.int8) - np.int8(ord("0"))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------
# URLs and the manifest


def shard_url(cfg: Config, name: str) -> str:
    """URL of a file in the shard set: loader.shard_url with {name}, else data.shards_dir/name."""
    if cfg.loader.shard_url:
        return cfg.loader.shard_url.format(name=name)
    return cfg.data.shards_dir.rstrip("/") + "/" + name


def open_url(url: str) -> BinaryIO:
    """A local path, a `pipe:` command (webdataset's convention) or any fsspec URL (s3://...)."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen_pipe

        return gopen_pipe(url, "rb")
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), "rb")
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise DataError(f"cannot open {url}: {e}; install the fsspec backend for that scheme (s3fs for s3://).") from e
    return fs.open(path, "rb")


def _read_bytes(url: str) -> bytes:
    try:
        with open_url(url) as f:
            return f.read()
    except FileNotFoundError as e:
        raise DataError(f"{url} not found: run `dvc repro shard` (or python -m pipeline.shard) first.") from e


def read_manifest(cfg: Config) -> dict:
    """The shard set's manifest.json as a dict."""
    return json.loads(_read_bytes(shard_url(cfg, "manifest.json")))


def manifest_hash(cfg: Config) -> str:
    """sha256 of manifest.json: identifies the exact shard set (content, not location)."""
    return hashlib.sha256(_read_bytes(shard_url(cfg, "manifest.json"))).hexdigest()


def _split_info(manifest: dict, split: str) -> dict:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}.")
    return manifest["splits"][split]


def batches_per_epoch(cfg: Config, split: str, world_size: int, batch_size: int | None = None) -> int:
    """Full batches each rank yields per epoch: ceil(N / (world_size * batch_size))."""
    count = _split_info(read_manifest(cfg), split)["count"]
    return _batches_per_epoch(count, world_size, batch_size or cfg.loader.batch_size)


def _batches_per_epoch(count: int, world_size: int, batch_size: int) -> int:
    return math.ceil(count / (world_size * batch_size))


# ---------------------------------------------------------------------------------------------
# The epoch plan: which positions each rank and stream reads


@dataclass(frozen=True)
class Segment:
    url: str
    begin: int  # sample indices within the shard, end exclusive
    end: int
    shard_count: int  # samples the manifest lists for the shard
    sha256: str = ""  # the manifest's hash of the shard: checked at this process's first read ("" = not checked)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


def _epoch_shards(cfg: Config, shards: list[dict], train: bool, epoch: int) -> list[dict]:
    if not train:
        return shards
    order = list(range(len(shards)))
    random.Random(_seed(cfg.train.seed, epoch)).shuffle(order)  # the same on every rank
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


# ---------------------------------------------------------------------------------------------
# Reading


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


def split_member(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension), as webdataset splits it: at the first dot of the
    base name, the folders kept in the key ("a.b/000001.npy" -> ("a.b/000001", "npy"))."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


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


def _read_segment(seg: Segment, image_ext: str) -> Iterator[dict]:
    """Samples seg.begin..seg.end of one shard, as raw member bytes."""
    index, sample = -1, None
    try:
        with _open_verified(seg) as stream:
            for name, buffer, start, size in _tar_members(stream):
                key, ext = split_member(name)
                if sample is None or key != sample["key"]:
                    if sample is not None and index >= seg.begin:
                        yield _complete(sample, seg, image_ext)
                    index += 1
                    sample = {"key": key, "url": seg.url}
                    if index >= seg.end:
                        return
                if index >= seg.begin and ext in (image_ext, META_MEMBER):
                    sample[ext] = buffer[start : start + size]
    except (OSError, ValueError) as e:
        raise ShardError(f"{seg.url}: {e}") from e
    if sample is not None and index >= seg.begin:
        yield _complete(sample, seg, image_ext)
    if index + 1 < seg.end:
        raise ShardError(f"{seg.url}: ended after {index + 1} samples but the manifest lists {seg.shard_count}")


READ_BYTES = 4 << 20  # per read of a shard: hundreds of members, and a segment that ends early stops soon
END_OF_ARCHIVE = bytes(512)


def _tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, buffer, offset, size) of each regular member of a tar stream: its bytes are
    buffer[offset : offset + size]. ustar as pipeline/shard.py writes it; pax and GNU long-name
    records as webdataset's TarWriter and GNU tar write them. Raises ValueError, in words, at the
    first damage, after the members before it.

    Python's tarfile costs more than decoding a raw image, so this reads the stream in large
    pieces, walks the 512-byte headers itself, checks each piece's header checksums in one numpy
    pass before it hands out the piece's members, and never parses a member.
    """
    buffer, at_end = b"", False
    while True:
        piece = stream.read(READ_BYTES)
        buffer, at_end = buffer + piece, not piece
        members, walked, damage, ended = _walk_headers(buffer, at_end)
        for name, start, size in members:
            yield name, buffer, start, size
        if damage:
            raise ValueError(damage)
        if ended:
            return
        buffer = buffer[walked:]


def _walk_headers(buffer: bytes, at_end: bool) -> tuple[list[tuple[str, int, int]], int, str | None, bool]:
    """The whole members at the start of `buffer` -> (members as (name, offset, size), bytes
    walked, the damage in words or None, whether the end-of-archive block was reached).
    `at_end`: no more bytes will come, so a member cut short is damage rather than a reason to
    read on."""
    members: list[tuple[str, int, int, int]] = []  # (name, offset, size, header number)
    headers: list[int] = []  # header offsets
    offset, damage, ended = 0, None, False
    # A pax ("x") or GNU long-name ("L") record names the member after it (webdataset's TarWriter,
    # Python's tarfile and GNU tar write them); where its member is not here yet, the walk
    # stops before the record, so the next piece is walked from it again.
    pending: dict[str, str] = {}
    pending_from: int | None = None
    try:
        while True:
            header = buffer[offset : offset + 512]
            if header == END_OF_ARCHIVE:
                ended = True
                break
            following = offset + 512  # the next header, once this one's size is known
            if following <= len(buffer):
                headers.append(offset)
                kind = header[156:157]
                size = _octal(header[124:136])
                following += (size + 511) // 512 * 512
            if following > len(buffer):  # not all here: read on (its header is still checked)
                if at_end:
                    raise ValueError(
                        f"unexpected end of data, {following - len(buffer)} bytes short: the shard is truncated"
                    )
                break
            body = buffer[offset + 512 : offset + 512 + size]
            if kind in b"xL":
                pending_from = offset if pending_from is None else pending_from
                pending |= _pax_records(body) if kind == b"x" else {"path": body.split(b"\0", 1)[0].decode()}
            elif kind not in b"gK":  # a global pax record or a long link name: nothing a sample uses
                if kind in (b"0", b"\0"):
                    name = pending.get("path") or _ustar_name(header)
                    members.append((name, offset + 512, size, len(headers) - 1))
                pending, pending_from = {}, None
            offset = following
    except ValueError as e:
        damage = str(e)
    bad = _first_bad_checksum(buffer, headers)
    if bad is not None:  # nothing from a corrupt header on can be trusted, its own error included
        members = [m for m in members if m[3] < bad]
        damage = "bad tar header checksum: the shard is corrupt"
    walked = offset if pending_from is None or damage or ended else pending_from
    return [m[:3] for m in members], walked, damage, ended


def _ustar_name(header: bytes) -> str:
    """The member name of a ustar header: its prefix field (bytes 345-500), then the name field."""
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(body: bytes) -> dict[str, str]:
    """A pax extended header's "LEN key=value\\n" records; ValueError when malformed."""
    records, at = {}, 0
    while at < len(body) and body[at] != 0:
        space = body.find(b" ", at)
        if space <= at or not body[at:space].isdigit():
            raise ValueError("malformed pax header: the shard is corrupt")
        length = int(body[at:space])  # the record's whole length, its digits included
        record = body[space + 1 : at + length]
        if length <= space - at + 1 or at + length > len(body) or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError("malformed pax header: the shard is corrupt")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "replace")
        at += length
    return records


def _octal(field: bytes) -> int:
    """A tar number field: octal digits up to the first NUL, spaces around them allowed."""
    digits = field[:-1]  # usually zero-padded digits and a NUL
    if field[-1] != 0 or digits.strip(b"01234567"):
        digits = field.split(b"\0", 1)[0].strip(b" ")
        if digits.strip(b"01234567"):  # a sign, underscore or anything int() would take but tar does not
            raise ValueError(f"tar header field {field!r} is not a number: the shard is corrupt")
    return int(digits or b"0", 8)


def _first_bad_checksum(buffer: bytes, headers: list[int]) -> int | None:
    """Number of the first header whose checksum (its bytes' sum, the checksum field counted
    as spaces) is not the one its checksum field holds, or None."""
    if not headers:
        return None
    blocks = np.frombuffer(buffer, np.uint8, count=len(buffer) // 512 * 512).reshape(-1, 512)
    rows = blocks[np.asarray(headers) // 512].astype(np.int64)  # tar headers sit on 512-byte blocks
    sums = rows.sum(axis=1) - rows[:, 148:156].sum(axis=1) + 8 * 32
    # Fields as tar writes them (6 octal digits, NUL) are compared here, all at once; others one by one.
    written = (sums[:, None] >> np.arange(15, -1, -3)) % 8 + ord("0")
    ok = np.all(rows[:, 148:154] == written, axis=1) & (rows[:, 154] == 0)
    for i in np.flatnonzero(~ok):
        try:
            if _octal(buffer[headers[i] + 148 : headers[i] + 156]) == sums[i]:
                continue
        except ValueError:  # no number: a bad checksum
            pass
        return int(i)
    return None


def _complete(sample: dict, seg: Segment, image_ext: str) -> dict:
    for ext in (image_ext, META_MEMBER):
        if ext not in sample:
            raise ShardError(f"{seg.url}: sample {sample['key']} has no .{ext} member")
    return sample


def _read_segments(segments: list[Segment], image_ext: str, skips: _Skips) -> Iterator[dict]:
    for seg in segments:
        read = 0
        try:
            for sample in _read_segment(seg, image_ext):
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


@dataclass(frozen=True)
class _Stream:
    """One stream's share of a rank's epoch: batches first + i * V for i < n_batches."""

    first: int
    n_batches: int
    segments: list[Segment]
    seed: int  # for the shuffle buffer; unused when not shuffling


class _EpochDataset(IterableDataset):
    """Yields the rank's batches skip_batches.. in order, split over DataLoader processes."""

    def __init__(
        self,
        streams: list[_Stream],
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
                message["_skipped"], skips.pending = skips.pending, []
                yield message
        except ShardError as e:  # delivered as data: ShardLoader raises it with this message alone
            yield {"_error": str(e)}

    def _deliver(self, index: int, batch: list[tuple]) -> dict | None:
        """Batch `index` as tensors, or written into the ring with only its number and keys to send."""
        if self.ring is None:
            return _collate(batch)
        if not self.ring.put(index, [b[0] for b in batch], [b[1] for b in batch]):
            return None
        return {"_ring": index, "key": [b[2] for b in batch]}

    def _batches(self, stream: _Stream, skips: _Skips) -> Iterator[list[tuple]]:
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
        return image, decode_attrs(sample[META_MEMBER]), sample["key"]


def _collate(batch: list[tuple]) -> dict:
    images = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, H, W, 3)
    return {
        "image": images.permute(0, 3, 1, 2),  # (B, 3, H, W), channels_last in memory
        "attrs": torch.from_numpy(np.stack([b[1] for b in batch])),  # (B, 40) int8
        "key": [b[2] for b in batch],
    }


def _as_is(batch: dict) -> dict:
    return batch


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
        if getattr(self, "ring", None) is not None:  # getattr: __del__ of a half-built loader
            self.ring.close()
        self._batches = None

    def __del__(self) -> None:
        self.close()  # e.g. the next epoch's loader, started early, when training stops first

    def __iter__(self) -> Iterator[dict]:
        self.start()
        batches, error, self._batches = self._batches, None, None
        try:
            for batch in batches:
                error = batch.get("_error")
                if error:
                    break
                for url, count in batch.pop("_skipped"):
                    self.skipped += count
                    self.skipped_by_shard[url] = self.skipped_by_shard.get(url, 0) + count
                if self.skipped > self.tolerance:  # each process checks its own; this is the rank's total
                    error = (
                        f"corrupt shards {sorted(self.skipped_by_shard)}: {self.skipped} samples skipped, "
                        f"more than loader.corrupt_tolerance={self.tolerance}; re-create them with "
                        f"`dvc repro shard`."
                    )
                    break
                yield self._receive(batch)
                if self.ring is not None:
                    self.ring.settle()  # the next batch is wanted: free the last one's slot once copied
        finally:
            self.close()  # no DataLoader process may be left waiting for a slot
            del batches  # stops the worker processes before raising
        if error:
            raise ShardError(error)
        if self.skipped:
            log.warning("skipped %d samples from corrupt shards: %s", self.skipped, self.skipped_by_shard)

    def _receive(self, batch: dict) -> dict:
        if "_ring" in batch:
            batch["image"], batch["attrs"] = self.ring.take(batch.pop("_ring"), self.device)
        elif self.device is not None:
            batch["image"] = batch["image"].to(self.device, non_blocking=True)
        return batch


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
    info = _split_info(manifest, split)
    n_batches = _batches_per_epoch(info["count"], world_size, batch_size)
    if not 0 <= skip_batches <= n_batches:
        raise ValueError(f"skip_batches={skip_batches} is outside the epoch's {n_batches} batches.")
    shards = _epoch_shards(cfg, info["shards"], train, epoch)
    per_stream = _stream_batches(n_batches, streams)
    start = rank * n_batches * batch_size
    plan = []
    for v, count in enumerate(per_stream):
        stop = start + count * batch_size
        seg = _segments(cfg, shards, start, stop) if count else []
        plan.append(_Stream(first=v, n_batches=count, segments=seg, seed=_seed(cfg.train.seed, epoch, rank, v)))
        start = stop
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
    current = loader(epoch=epoch, skip_batches=skip, rings_alive=3)
    step = start
    while True:
        upcoming = None
        for i, batch in enumerate(current):
            if i == 0:
                upcoming = loader(epoch=epoch + 1).start()
            yield step, batch
            step += 1
        epoch += 1
        current = upcoming or loader(epoch=epoch)


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
