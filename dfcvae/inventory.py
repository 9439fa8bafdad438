"""The inventory: what the fetch stage found in the source, one row per image. It replaces a copy.

    data.inventory_dir/
        images.parquet   one row per image (SCHEMA), sorted by key
        dataset.json     the source (where to read it again: `source`), counts, split; shard
                         copies it into the manifest
        report.json      data.source folder: files skipped and why, groups of identical images,
                         a split carved out of train/

The shard stage reads each image from the source by its path and checks its bytes against the
sha256 recorded here, so an image changed after fetch is never silently used. DVC tracks this
folder (three files, whatever the number of images) instead of a copy of every image.

Parquet, through pyarrow (Ray Data's own format): columnar and compressed, about 100 bytes an
image. The path column is binary, so any name a filesystem allows (any bytes but / and NUL) is
kept exactly: `os.fsencode` of the POSIX path within the source.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dfcvae.shards.format import SPLITS, DataError

INVENTORY_FILE = "images.parquet"
DATASET_FILE = "dataset.json"
REPORT_FILE = "report.json"
SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the sample's key in the shards
        pa.field("path", pa.binary(), nullable=False),  # os.fsencode(path within the source)
        pa.field("size", pa.int64(), nullable=False),  # bytes; 0 for a drawn synthetic face
        pa.field("mtime_ns", pa.int64(), nullable=False),  # 0 for a drawn synthetic face
        pa.field("sha256", pa.binary(32)),  # of the file's bytes; null for a drawn synthetic face
        pa.field("split", pa.int8(), nullable=False),  # 0 train, 1 val, 2 test (SPLITS)
        pa.field("attrs", pa.binary(40)),  # 40 bytes of 0/1 in ATTRIBUTE_NAMES order; null = none
        pa.field("identity", pa.int32()),  # CelebA's identity; null = none
    ]
)


@dataclass(frozen=True)
class Row:
    key: str
    path: str  # POSIX, surrogate escapes for undecodable bytes (os.fsdecode)
    size: int
    mtime_ns: int
    sha256: bytes | None
    split: int
    attrs: bytes | None = None
    identity: int | None = None

    @property
    def split_name(self) -> str:
        return SPLITS[self.split]


def write_inventory(folder: Path, rows: list[Row], dataset: dict, report: dict | None = None) -> None:
    """images.parquet (rows sorted by key), dataset.json and, when given, report.json into folder."""
    rows = sorted(rows, key=lambda r: r.key)
    columns = {name: [getattr(r, name) for r in rows] for name in SCHEMA.names}
    columns["path"] = [os.fsencode(p) for p in columns["path"]]
    pq.write_table(pa.table(columns, schema=SCHEMA), folder / INVENTORY_FILE, compression="zstd")
    (folder / DATASET_FILE).write_text(json.dumps(dataset, indent=1, sort_keys=True) + "\n")
    if report is not None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


def read_table(folder: Path) -> pa.Table:
    """images.parquet as an Arrow table (SCHEMA); DataError naming the fix when it is not there,
    cannot be read, or has another schema.

    A folder an older fetch wrote (a copy of the images, img_align_celeba/ and CelebA's tables)
    is named as such, with what to run."""
    path = Path(folder) / INVENTORY_FILE
    if not path.is_file():
        if (Path(folder) / "img_align_celeba").is_dir() or (Path(folder) / "list_eval_partition.txt").is_file():
            raise DataError(
                f"{folder} holds a copy of the images made by an older fetch, not an inventory: run "
                "`dvc repro fetch` (fetch now lists the images where they are), then delete that copy."
            )
        raise DataError(f"{path} not found: run `dvc repro fetch` (or python -m pipeline.fetch) first.")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path} is not a readable inventory ({err}): run `dvc repro -f fetch`.") from None
    if table.schema.remove_metadata() != SCHEMA:
        raise DataError(f"{path} is not an inventory this version reads: run `dvc repro -f fetch`.")
    return table


def rows(table: pa.Table) -> list[Row]:
    """The table's rows as Row (paths decoded with os.fsdecode)."""
    return [Row(**{**r, "path": os.fsdecode(r["path"])}) for r in table.to_pylist()]


def read_dataset(folder: Path) -> dict:
    """dataset.json; DataError naming the fix when it is not there."""
    path = Path(folder) / DATASET_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run `dvc repro fetch` (or python -m pipeline.fetch) first.")
    return json.loads(path.read_text())


def read_report(folder: Path) -> dict:
    """report.json, or {} (fetch writes one for a folder source only)."""
    path = Path(folder) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
