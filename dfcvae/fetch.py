"""An inventory of the source's images in data.inventory_dir, not a copy: the work of the fetch stage.

`fetch(cfg)` replaces data.inventory_dir whole (written beside it in `<inventory_dir>.partial/`,
swapped in when complete: a failure leaves the previous inventory) with dfcvae/inventory.py's
files: images.parquet, one row per image (its path in the source, size, modification time,
sha256 of its bytes, split, CelebA's attributes and identity), dataset.json and report.json.
The images stay where they are; the shard stage reads them from there.

data.source picks where the images come from (SOURCES):
    celeba     CelebA from data.celeba_dir, in any layout people have: img_align_celeba/ or
               img_align_celeba.zip (read in place, member by member), the official .txt
               tables or Kaggle's .csv ones, flat or in the Drive's Img/ Anno/ Eval/ folders or
               torchvision's celeba/ folder; when missing and data.download is true,
               torchvision's downloader (checksums verified). Counts are checked against
               data.celeba_counts and the 40 attribute names.
    synthetic  data.synthetic_count procedurally drawn faces, deterministic for data.seed, whose
               SYNTHETIC_ATTRIBUTES are true by construction (the others are all -1); split
               into train/val/test by data.split_fractions. Drawn by shard, when it reads them.
               Demo and test data, labelled so.
    folder     every image file under data.folder_dir, a local folder (recursive,
               FOLDER_SUFFIXES, symbolic links followed) or any fsspec URL (s3://bucket/prefix,
               read in parallel, credentials from the environment); split into train/val/test by
               a seeded hash of each file's content, so copies of one image share a split; or by
               the folder's own train/, val/ and test/ folders, a missing val/ or test/ carved out
               of train/ by the same hash. No attributes.

DVC does not track data.celeba_dir or data.folder_dir (they need not exist for other sources, and
may not be local): `pipeline.retrain` lists the source again and compares it with the inventory
(`inputs_changed`); after changing them by hand, run `dvc repro -f fetch`.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import math
import shutil
import sys
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dfcvae.config import Config
from dfcvae.files import DiskFullError, disk_full_message, staging_dir, swap_in
from dfcvae.images import FOLDER_SUFFIXES
from dfcvae.inventory import DATASET_FILE, Row, read_dataset, read_table, rows, write_inventory
from dfcvae.shards.format import ATTRIBUTE_NAMES, SPLITS, DataError, check_split_counts
from dfcvae.sources import (
    CelebaSource,
    Entry,
    FolderSource,
    ImageSource,
    SyntheticSource,
    face_rng,
    read_many,
    source_from_record,
    source_record,
)
from dfcvae.synthetic import SYNTHETIC_ATTRIBUTES, attribute_row, sample_attributes

IMAGE_DIR = "img_align_celeba"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


# ---------------------------------------------------------------------------------------------
# The official tables


def read_partition(path: Path) -> dict[str, int]:
    """list_eval_partition.txt ("000001.jpg 0") or Kaggle's .csv (header image_id,partition)."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
    else:
        rows = [line.split() for line in path.read_text().splitlines()]
    return {row[0]: int(row[1]) for row in rows if row}


def read_attrs(path: Path) -> dict[str, list[int]]:
    """list_attr_celeba.txt (count, names, rows) or Kaggle's .csv (image_id + names, rows)."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        names, rows = rows[0][1:], rows[1:]
    else:
        lines = path.read_text().splitlines()
        names, rows = lines[1].split(), [line.split() for line in lines[2:]]
    if tuple(names) != ATTRIBUTE_NAMES:
        raise DataError(f"{path} does not have CelebA's 40 attribute columns in order: use the official file.")
    return {row[0]: [int(v) for v in row[1:]] for row in rows if row}


# ---------------------------------------------------------------------------------------------
# source: celeba


@dataclass(frozen=True)
class CelebaFiles:
    images: Path  # a folder of NNNNNN.jpg or img_align_celeba.zip
    partition: Path
    attrs: Path
    identity: Path | None


def _celeba_help(root: Path) -> str:
    return (
        f"put img_align_celeba/ (or img_align_celeba.zip), list_eval_partition.txt and list_attr_celeba.txt "
        f"(or Kaggle's .csv versions) from {CELEBA_URL} in {root}/"
    )


def find_celeba(root: Path) -> tuple[CelebaFiles | None, list[str]]:
    """CelebA's files under root in any common layout -> (files, []) or (None, what is missing)."""
    dirs = [root, root / "celeba"]  # torchvision downloads to <root>/celeba
    dirs += [d / sub for d in list(dirs) for sub in ("Img", "Anno", "Eval")]  # the Drive's folders

    def first(*names: str) -> Path | None:
        return next((d / n for d in dirs for n in names if (d / n).is_file()), None)

    folders = [d / IMAGE_DIR / IMAGE_DIR for d in dirs] + [d / IMAGE_DIR for d in dirs]  # Kaggle nests it
    images = next((f for f in folders if f.is_dir() and next(f.glob("*.jpg"), None)), None)
    found = {
        "img_align_celeba/ or img_align_celeba.zip": images or first("img_align_celeba.zip"),
        "list_eval_partition.txt or .csv": first("list_eval_partition.txt", "list_eval_partition.csv"),
        "list_attr_celeba.txt or .csv": first("list_attr_celeba.txt", "list_attr_celeba.csv"),
    }
    missing = [name for name, path in found.items() if path is None]
    if missing:
        return None, missing
    return CelebaFiles(*found.values(), identity=first("identity_CelebA.txt")), []


def download_celeba(root: Path) -> None:
    """torchvision's CelebA downloader: Google Drive, md5 checked, zip extracted to root/celeba."""
    from torchvision.datasets import CelebA

    CelebA(root=str(root), split="all", target_type="attr", download=True)


def fetch_celeba(cfg: Config) -> tuple[list[Row], dict, dict | None]:
    root = Path(cfg.data.celeba_dir)
    files, missing = find_celeba(root)
    if files is None and cfg.data.download:
        try:
            download_celeba(root)
        except Exception as e:  # network, quota or checksum: all end in the same advice
            raise DataError(
                f"CelebA is not in {root} and the download failed ({type(e).__name__}: {e}); "
                f"{_celeba_help(root)} and run again."
            ) from e
        files, missing = find_celeba(root)
    if files is None:
        raise DataError(
            f"CelebA not found in {root} (missing {', '.join(missing)}): {_celeba_help(root)}, "
            "or set data.download: true."
        )
    partition, attrs = read_partition(files.partition), read_attrs(files.attrs)
    _check_celeba(files, partition, attrs, cfg.data.celeba_counts)
    identity = read_identity(files.identity) if files.identity else {}
    source = CelebaSource(str(files.images))
    names = sorted(partition)
    entries = source.list(names)
    digests = hash_entries(source, entries, "fetch: hash")
    inventory = [
        Row(
            Path(name).stem,
            entry.path,
            entry.size,
            entry.mtime_ns,
            digest,
            partition[name],
            bytes(int(v == 1) for v in attrs[name]),
            identity.get(name),
        )
        for name, entry, digest in zip(names, entries, digests)
    ]
    counts = [sum(p == k for p in partition.values()) for k in range(3)]
    info = {
        "source": "celeba",
        "counts": dict(zip(SPLITS, counts)),
        "read_from": source_record(source),
        "tables": table_digests(files),
    }
    return inventory, info, None


def table_digests(files: CelebaFiles) -> dict[str, str]:
    """sha256 of each of CelebA's tables fetch read: the retrain check compares them too."""
    tables = [files.partition, files.attrs] + ([files.identity] if files.identity else [])
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in tables}


def read_identity(path: Path) -> dict[str, int]:
    """identity_CelebA.txt: "000001.jpg 2880" per line."""
    pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {name: int(value) for name, value in pairs}


def _check_celeba(files: CelebaFiles, partition: dict, attrs: dict, expected: tuple[int, ...]) -> None:
    counts = tuple(sum(p == k for p in partition.values()) for k in range(3))
    if counts != tuple(expected):
        raise DataError(
            f"{files.partition} lists {counts} train/val/test images, not {tuple(expected)}: "
            "point data.celeba_dir at the full CelebA (or set data.celeba_counts for a deliberate subset)."
        )
    if set(attrs) != set(partition):
        raise DataError(f"{files.attrs} and {files.partition} list different images: use the official files.")
    bad = next((name for name, row in attrs.items() if len(row) != 40 or not set(row) <= {1, -1}), None)
    if bad:
        raise DataError(f"{files.attrs}: the row for {bad} is not 40 values of 1/-1: use the official file.")
    if files.images.is_file():
        open_zip(files.images).close()  # a quota page or a cut download says so in one sentence
    available = set(CelebaSource(str(files.images)).members())
    absent = sorted(set(partition) - available)
    if absent:
        raise DataError(
            f"{len(absent)} images listed in {files.partition} are not in {files.images} "
            f"(first: {absent[0]}): complete or replace the image folder."
        )


def open_zip(path: Path) -> zipfile.ZipFile:
    """The zip, or DataError saying what the file is instead (a quota page, a cut download)."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        head = path.read_bytes()[:512].lstrip().lower() if path.is_file() else b""
        what = (
            "an HTML page (Google Drive's quota or virus-scan notice), not the zip"
            if head.startswith((b"<!doctype html", b"<html"))
            else f"not a readable zip ({err}); the download was probably cut short"
        )
        raise DataError(
            f"{path} ({path.stat().st_size if path.is_file() else 0:,} bytes) is {what}: "
            f"delete it and {_celeba_help(path.parent)}."
        ) from None


# ---------------------------------------------------------------------------------------------
# source: synthetic


def make_synthetic(cfg: Config) -> tuple[list[Row], dict, dict | None]:
    """Rows for data.synthetic_count faces: their attributes (drawn first, from the face's own
    generator), no bytes; shard draws each face when it reads it."""
    d = cfg.data
    n = d.synthetic_count
    counts = _split_counts(n, d.split_fractions)
    check_split_counts(
        dict(zip(SPLITS, counts)), f"data.synthetic_count={n} with data.split_fractions={list(d.split_fractions)}"
    )
    inventory = []
    for i in range(1, n + 1):
        split = 0 if i <= counts[0] else 1 if i <= counts[0] + counts[1] else 2  # consecutive, as CelebA's
        values = attribute_row(sample_attributes(face_rng(d.seed, i)))
        inventory.append(Row(f"{i:06d}", f"{i:06d}.jpg", 0, 0, None, split, bytes(int(v == 1) for v in values)))
    info = {
        "source": "synthetic",
        "note": "procedurally drawn faces, not CelebA: for demos and tests",
        "seed": d.seed,
        "count": n,
        "counts": dict(zip(SPLITS, counts)),
        "attributes_by_construction": list(SYNTHETIC_ATTRIBUTES),
        "read_from": source_record(SyntheticSource(d.seed)),
    }
    return inventory, info, None


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """train/val/test sizes from fractions, each split at least 1 image when fraction > 0."""
    val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
    return [n - val - test, val, test]


# ---------------------------------------------------------------------------------------------
# Reading every image once, for its hash


def hash_entries(source: ImageSource, entries: list[Entry], desc: str) -> list[bytes]:
    """sha256 of each entry's bytes, read from the source (in parallel for a remote one);
    DataError naming the first image that cannot be read."""
    digests = []
    with tqdm(total=len(entries), desc=desc, unit="img", mininterval=1) as bar:
        for entry, data in zip(entries, read_many(source, [e.path for e in entries])):
            if isinstance(data, BaseException):
                raise DataError(
                    f"{source.location(entry.path)} cannot be read ({type(data).__name__}: {data}): "
                    "fix or remove it, then run fetch again."
                ) from data
            digests.append(hashlib.sha256(data).digest())
            bar.update()
    return digests


# ---------------------------------------------------------------------------------------------
# source: folder


# An ImageFolder-style layout: these top-level folder names are the splits, honoured as they are.
SPLIT_FOLDERS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def folder_split(paths: list[str]) -> str:
    """ "folders" when every image lies under a top-level train/, val/ (valid/, validation/) or test/
    folder, with train and val or test present; otherwise "hash"."""
    tops = {p.split("/")[0].lower() if "/" in p else "" for p in paths}
    present = {SPLIT_FOLDERS.get(t) for t in tops}
    if tops <= set(SPLIT_FOLDERS) and 0 in present and present & {1, 2}:
        return "folders"
    return "hash"


def inventory_folder(cfg: Config) -> tuple[list[Row], dict, dict | None]:
    """Rows for every image under data.folder_dir; a file's split follows from its content (sha256
    of its bytes), so identical images always share a split (or, where the user's own
    train/val/test folders put copies in different splits, are reported and left where the user
    put them)."""
    d = cfg.data
    if not d.folder_dir:
        raise DataError("data.folder_dir is empty: set it to the folder (or s3:// URL) of your images.")
    source = FolderSource(d.folder_dir)
    entries, skipped, links = source.list()
    if not entries:
        raise DataError(
            f"no image files under {d.folder_dir} ({len(skipped)} other files, read: "
            f"{'/'.join(sorted(FOLDER_SUFFIXES))}): put your images there."
        )
    paths = [e.path for e in entries]
    split_by = folder_split(paths)
    width = max(6, len(str(len(entries))))
    user_splits = {SPLIT_FOLDERS[p.split("/")[0].lower()] for p in paths} if split_by == "folders" else set()
    carved = {k for k in (1, 2) if split_by == "folders" and k not in user_splits}
    digests = hash_entries(source, entries, "fetch: hash")
    inventory, by_content = [], defaultdict(list)
    for i, (entry, digest) in enumerate(zip(entries, digests), start=1):
        hexdigest = digest.hex()
        if split_by == "folders":
            split = _carve(
                SPLIT_FOLDERS[entry.path.split("/")[0].lower()], carved, d.seed, hexdigest, d.split_fractions
            )
        else:
            split = _hash_split(d.seed, hexdigest, d.split_fractions)
        inventory.append(Row(f"{i:0{width}d}", entry.path, entry.size, entry.mtime_ns, digest, split))
        by_content[hexdigest].append(inventory[-1])
    counts = [sum(r.split == k for r in inventory) for k in range(3)]
    how = (
        "the folder's own train/val/test folders"
        if split_by == "folders"
        else f"data.split_fractions={list(d.split_fractions)}"
    )
    check_split_counts(dict(zip(SPLITS, counts)), f"{len(entries)} images in {d.folder_dir}, split by {how}")
    duplicates = _duplicates(by_content)
    report = {
        "skipped": [{"file": path, "reason": why} for path, why in skipped],
        "duplicates": duplicates,
        "links_followed": links,
        "carved": [_carve_note(k, d.split_fractions) for k in carved],
    }
    _say_folder(d.folder_dir, skipped, duplicates, report["carved"])
    info = {
        "source": "folder",
        "folder_dir": d.folder_dir,
        "count": len(entries),
        "counts": dict(zip(SPLITS, counts)),
        "split": split_by,
        "split_key": "sha256 of the file's bytes",
        "skipped": len(skipped),
        "links_followed": links,
        "duplicates": {
            "groups": len(duplicates),
            "extra_copies": sum(len(g["files"]) - 1 for g in duplicates),
            "groups_across_splits": sum(len(set(g["splits"])) > 1 for g in duplicates),
        },
        "carved": report["carved"],
        "read_from": source_record(source),
    }
    return inventory, info, report


def _unit_hash(seed: int, digest: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{digest}".encode()).digest()[:8], "big") / 2**64


def _hash_split(seed: int, digest: str, fractions: tuple[float, float, float]) -> int:
    """0/1/2 from a seeded hash of the content: identical files share a split, and a file keeps its
    split when others are added or removed."""
    u = _unit_hash(seed, digest)
    return 0 if u < fractions[0] else 1 if u < fractions[0] + fractions[1] else 2


def _carve(split: int, carved: set[int], seed: int, digest: str, fractions: tuple[float, float, float]) -> int:
    """The user's split, or for a train image where the folder has no val/ (or no test/): that split
    for a share fractions[k] / (fractions[0] + fractions[k]) of train, by the seeded content hash."""
    if split != 0 or not carved:
        return split
    (k,) = carved  # folder_split needs train and one of val/test: at most one is missing
    return k if _unit_hash(seed, digest) < fractions[k] / (fractions[0] + fractions[k]) else 0


def _carve_note(k: int, fractions: tuple[float, float, float]) -> str:
    share = fractions[k] / (fractions[0] + fractions[k])
    return (
        f"the folder has no {SPLITS[k]}/ folder: {SPLITS[k]} is {share:.1%} of train/ "
        f"(data.split_fractions' {SPLITS[k]} share relative to train), chosen by a seeded hash of each file's content"
    )


def _duplicates(by_content: dict[str, list[Row]]) -> list[dict]:
    return [
        {"sha256": digest, "files": [r.path for r in group], "splits": [r.split_name for r in group]}
        for digest, group in sorted(by_content.items())
        if len(group) > 1
    ]


def _say_folder(root: str, skipped: list[tuple[str, str]], duplicates: list[dict], carved: list[str]) -> None:
    """One line each for what the user should know: skipped files, duplicates across splits, a carved split."""
    if skipped:
        reasons = Counter(r.split(":")[0].split(" (")[0] for _, r in skipped)
        summary = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        _warn(f"{len(skipped)} files under {root} are not images read here ({summary}): report.json lists each")
    across = [g for g in duplicates if len(set(g["splits"])) > 1]
    if across:
        _warn(
            f"{len(across)} groups of identical images ({sum(len(g['files']) for g in across)} files) lie in more "
            f"than one of your {'/'.join(SPLITS)} folders, so the test metrics include images the model trained "
            "on: report.json lists them; your files were not moved"
        )
    for note in carved:
        _warn(note)


def _warn(message: str) -> None:
    print(f"fetch: {message}.", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The stage

SOURCES = {"celeba": fetch_celeba, "synthetic": make_synthetic, "folder": inventory_folder}


def fetch(cfg: Config) -> dict:
    """Rewrite data.inventory_dir from data.source; returns what dataset.json says about it.
    DataError (one sentence) for a source that is missing, unreadable or does not split."""
    d = cfg.data
    if not math.isclose(sum(d.split_fractions), 1.0) or min(d.split_fractions) < 0:
        raise DataError(f"data.split_fractions={list(d.split_fractions)} must be three fractions >= 0 that sum to 1.")
    target = Path(d.inventory_dir)
    inputs = {"celeba": d.celeba_dir, "folder": d.folder_dir}.get(d.source)
    local = inputs and (inputs.startswith("file://") or "://" not in inputs)
    _check_not_inputs(target, Path(inputs.removeprefix("file://")) if local else None)
    staging = staging_dir(target, (DATASET_FILE,))  # replaces inventory_dir only when complete
    try:
        inventory, info, report = SOURCES[d.source](cfg)
        write_inventory(staging, inventory, info, report)
    except BaseException as err:  # the previous inventory stays; nothing half-written is left
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(disk_full_message(staging.parent, 200 * _count(cfg), "the inventory")) from None
        raise
    swap_in(staging, target)
    return info


def _count(cfg: Config) -> int:
    return cfg.data.synthetic_count if cfg.data.source == "synthetic" else sum(cfg.data.celeba_counts)


def inputs_changed(cfg: Config) -> str | None:
    """A sentence saying how data.celeba_dir or data.folder_dir differs from the inventory the last
    fetch wrote (images added, removed, or changed in size or modification time), or None when it
    does not, or when there is nothing to compare (synthetic data, no inventory, no source)."""
    folder = Path(cfg.data.inventory_dir)
    try:
        info, recorded = read_dataset(folder), rows(read_table(folder))
    except DataError:
        return None
    source = source_from_record(info.get("read_from", {"kind": "synthetic", "seed": 0}))
    key = "folder_dir" if cfg.data.source == "folder" else "celeba_dir"
    try:
        if isinstance(source, FolderSource):
            current = source.list()[0]
        elif isinstance(source, CelebaSource):
            members = source.members()
            current = source.list([Path(r.path).name for r in recorded if Path(r.path).name in members])
            for path, digest in info.get("tables", {}).items():
                if not Path(path).is_file() or hashlib.sha256(Path(path).read_bytes()).hexdigest() != digest:
                    return f"data.celeba_dir's {Path(path).name} ({path}) changed since the last fetch"
        else:
            return None
    except (DataError, OSError, zipfile.BadZipFile) as err:
        return f"data.{key} ({getattr(cfg.data, key)}) cannot be listed as the last fetch listed it ({err})"
    before = {(r.path, r.size, r.mtime_ns) for r in recorded}
    now = {(e.path, e.size, e.mtime_ns) for e in current}
    if before == now:
        return None
    paths_before, paths_now = {p for p, _, _ in before}, {p for p, _, _ in now}
    added, removed = len(paths_now - paths_before), len(paths_before - paths_now)
    changed = len({p for p, _, _ in now - before} & paths_before)
    return (
        f"files in data.{key} ({getattr(cfg.data, key)}) changed since the last fetch "
        f"({added} added, {removed} removed, {changed} changed)"
    )


def _check_not_inputs(target: Path, inputs: Path | None) -> None:
    """Refuse an inventory_dir that holds the inputs or the project: replacing it would erase them."""
    resolved = target.resolve()
    keep = [Path.cwd().resolve()] + ([inputs.resolve()] if inputs else [])
    if any(resolved == k or resolved in k.parents for k in keep):
        raise DataError(
            f"data.inventory_dir={target} holds the project or the input data and would be erased: "
            "give it a folder of its own, such as data/inventory."
        )
