"""The shard format: member names, encoding and decoding, the manifest and its hash.

    <split>-NNNNNN.tar          split in SPLITS, a fixed number of samples each
        <key>.npy | <key>.png   the (H, W, 3) uint8 image: data.encoding raw | png
        <key>.attrs             40 int8 in ATTRIBUTE_NAMES order: 1 present, 0 absent, -1 unknown
        <key>.cls               CelebA's identity number in ASCII digits, when known
    manifest.json               format version, per-split counts, per-shard name/count/sha256,
                                preprocessing, source
    manifest.sha256             sha256 of manifest.json (`manifest_hash`)

Member names split as webdataset splits them (`split_member`), so webdataset's own `WebDataset`
reads these shards too (its `.cls` decoder gives the identity as an int; `.attrs` stays bytes).
Format 1 kept the attributes and the identity in a `<key>.json` sidecar; `read_manifest` refuses
those shards with the command that rewrites them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from dfcvae.config import Config, UserError

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
ATTRS_MEMBER = "attrs"
IDENTITY_MEMBER = "cls"
FORMAT_VERSION = 2  # 2: attributes as a binary member (1: a JSON sidecar)
PNG_COMPRESS_LEVEL = 6  # fixed, so PNG shards are byte-identical on reruns
MIN_SPLIT_IMAGES = 1  # an empty split fails late: training's validation, every tuning trial, evaluation


class DataError(UserError, RuntimeError):
    """A data problem, phrased so the user knows what to fix."""


class ShardError(DataError):
    """A shard that cannot be read; the message names the shard."""


def check_split_counts(counts: dict[str, int], what: str) -> None:
    """DataError naming the splits with fewer than MIN_SPLIT_IMAGES images, with the numbers."""
    short = [split for split, n in counts.items() if n < MIN_SPLIT_IMAGES]
    if short:
        raise DataError(
            f"{what} gives {', '.join(f'{s} {n}' for s, n in counts.items())} images: {' and '.join(short)} "
            f"{'is' if len(short) == 1 else 'are'} empty; training validates on val and evaluation measures on "
            "test, so every split needs images: add images or change data.split_fractions."
        )


# ---------------------------------------------------------------------------------------------
# Members


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def split_member(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension), as webdataset splits it: at the first dot of the
    base name, the folders kept in the key ("a.b/000001.npy" -> ("a.b/000001", "npy"))."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def encode_image(image: np.ndarray, encoding: str) -> tuple[str, bytes]:
    """(H, W, 3) uint8 -> (member extension, bytes) for data.encoding raw | png."""
    out = io.BytesIO()
    if encoding == "raw":
        np.lib.format.write_array(out, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    else:
        Image.fromarray(image, "RGB").save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return IMAGE_MEMBERS[encoding], out.getvalue()


def decode_image(ext: str, data: bytes, size: int) -> np.ndarray:
    """Member bytes -> (size, size, 3) uint8; only the two encodings we write, never pickle.
    ValueError, in words, for anything else."""
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


def encode_attrs(attrs: list[int] | None) -> bytes:
    """40 values in {0, 1} (None: unknown) -> the 40-byte `.attrs` member."""
    if attrs is None:
        return bytes([255]) * len(ATTRIBUTE_NAMES)  # int8 -1
    return np.asarray(attrs, dtype=np.int8).tobytes()


def decode_attrs(data: bytes) -> np.ndarray:
    """The `.attrs` member -> int8 (40,): 1/0, or all -1 when the sample has no attribute data.
    ValueError when it is not 40 values in {-1, 0, 1}."""
    if len(data) != len(ATTRIBUTE_NAMES):
        raise ValueError(f".{ATTRS_MEMBER} holds {len(data)} bytes, not {len(ATTRIBUTE_NAMES)}")
    attrs = np.frombuffer(data, np.int8)
    if (attrs < -1).any() or (attrs > 1).any():
        raise ValueError(f".{ATTRS_MEMBER} holds values outside -1, 0, 1")
    return attrs


def encode_identity(identity: int) -> bytes:
    return str(identity).encode()


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


def manifest_json(cfg: Config) -> tuple[dict, str]:
    """(the shard set's manifest.json as a dict, of any format version, its sha256 as
    `manifest_hash` gives it), from one read: what it says, for records. DataError when missing."""
    data = _read_bytes(shard_url(cfg, "manifest.json"))
    return json.loads(data), hashlib.sha256(data).hexdigest()


def read_manifest(cfg: Config) -> dict:
    """The shard set's manifest.json as a dict. DataError for shards of another format version."""
    manifest, _ = manifest_json(cfg)
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(
            f"the shards in {cfg.data.shards_dir} are format {manifest.get('format', 'unknown')} and this "
            f"version reads format {FORMAT_VERSION} (attributes as a binary member): re-shard with "
            "`dvc repro shard` (or python -m pipeline.shard)."
        )
    return manifest


def manifest_hash(cfg: Config) -> str:
    """sha256 of manifest.json: identifies the exact shard set (content, not location)."""
    return hashlib.sha256(_read_bytes(shard_url(cfg, "manifest.json"))).hexdigest()


def write_manifest(out_dir: Path, manifest: dict) -> str:
    """manifest.json (sorted keys, so reruns are byte-identical) and manifest.sha256; returns the hash."""
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (out_dir / "manifest.json").write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    (out_dir / "manifest.sha256").write_text(digest + "  manifest.json\n")
    return digest


def split_info(manifest: dict, split: str) -> dict:
    """The manifest's {"count", "shards"} of one split; ValueError for a split not in SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}.")
    return manifest["splits"][split]
