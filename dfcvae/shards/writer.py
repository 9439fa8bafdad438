"""Writing shards: samples -> one tar in the format of dfcvae.shards.format, byte-identical on reruns.

What goes in each shard is decided by dfcvae/sharding.py (the shard stage); the manifest that lists the
shards is written by `format.write_manifest`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfcvae.shards.format import ATTRS_MEMBER, IDENTITY_MEMBER, encode_attrs, encode_identity, encode_image


@dataclass(frozen=True)
class Sample:
    key: str  # the member names' stem: no dot, no slash
    image: np.ndarray  # (H, W, 3) uint8
    attrs: list[int] | None  # 40 values in {0, 1}, ATTRIBUTE_NAMES order; None = unknown
    identity: int | None = None


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed metadata (mtime 0, mode 644, no owner): byte-identical shards on reruns."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[Sample], encoding: str) -> dict:
    """Write `samples` to the tar `path` (as path.<pid>.tmp, renamed when complete), images in
    data.encoding raw | png; returns the manifest's entry {"name", "count", "sha256"}.
    Whatever iterating `samples` raises propagates, leaving the .tmp file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # its own name per attempt, on a shared disk too
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            ext, data = encode_image(sample.image, encoding)
            add_member(tar, f"{sample.key}.{ext}", data)
            add_member(tar, f"{sample.key}.{ATTRS_MEMBER}", encode_attrs(sample.attrs))
            if sample.identity is not None:
                add_member(tar, f"{sample.key}.{IDENTITY_MEMBER}", encode_identity(sample.identity))
            count += 1
    tmp.rename(path)
    return {"name": path.name, "count": count, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
