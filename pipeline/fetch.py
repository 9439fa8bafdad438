"""Stage `fetch`: the raw dataset, in CelebA's official layout, under data.raw_dir.

`fetch(cfg)` replaces data.raw_dir whole (written beside it in `<raw_dir>.partial/`, swapped in
when complete: a failure leaves the previous copy), with:

    img_align_celeba/NNNNNN.jpg    images (178x218 for CelebA and synthetic; any size for folder)
    list_eval_partition.txt        "NNNNNN.jpg P", P = 0 train, 1 val, 2 test
    list_attr_celeba.txt           count, the 40 names, then "NNNNNN.jpg" and 40 values of 1/-1
                                   (absent for data.source: folder, which has no attributes)
    identity_CelebA.txt            "NNNNNN.jpg ID", when CelebA's file is there
    source_files.json              data.source: folder only: {"NNNNNN.ext": "original/relative/path"}
                                   (JSON: any name the filesystem allows, undecodable bytes as
                                   os.fsencode's surrogate escapes)
    fetch_report.json              data.source: folder only: files skipped and why, groups of
                                   identical images, a split carved out of train/
    dataset.json                   {"source": ..., ...}; `shard` copies it into the manifest

data.source picks where the images come from (SOURCES):
    celeba     CelebA from data.celeba_dir, in any layout people have: img_align_celeba/ or
               img_align_celeba.zip, the official .txt tables or Kaggle's .csv ones, flat or
               in the Drive's Img/ Anno/ Eval/ folders or torchvision's celeba/ folder; when
               missing and data.download is true, torchvision's downloader (checksums verified).
               Counts are checked against data.celeba_counts and the 40 attribute names.
    synthetic  data.synthetic_count procedurally drawn faces, deterministic for data.seed, whose
               SYNTHETIC_ATTRIBUTES are true by construction (the others are all -1); split
               into train/val/test by data.split_fractions. Demo and test data, labelled so.
    folder     every image file under data.folder_dir (recursive, FOLDER_SUFFIXES, symbolic
               links followed), split into train/val/test by a seeded hash of each file's
               content, so copies of one image share a split; or by the folder's own train/,
               val/ and test/ folders, a missing val/ or test/ carved out of train/ by the
               same hash. No attributes.

The stage does not track the contents of data.celeba_dir or data.folder_dir (they need not
exist for other sources): after changing them, run `dvc repro -f fetch`.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dfcvae.config import Config
from dfcvae.files import DiskFullError, disk_full_message, staging_dir, swap_in
from dfcvae.images import FETCH_REPORT, FOLDER_SUFFIXES, SOURCE_FILES, FolderListing, list_folder
from dfcvae.shards.format import ATTRIBUTE_NAMES, SPLITS, DataError, check_split_counts
from dfcvae.synthetic import SYNTHETIC_ATTRIBUTES, attribute_row, draw_face
from pipeline.common import command, parse_config

IMAGE_DIR = "img_align_celeba"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


# ---------------------------------------------------------------------------------------------
# The official tables


def write_partition(raw: Path, partition: dict[str, int]) -> None:
    lines = (f"{name} {part}\n" for name, part in sorted(partition.items()))
    (raw / "list_eval_partition.txt").write_text("".join(lines))


def write_attrs(raw: Path, attrs: dict[str, list[int]]) -> None:
    """CelebA's list_attr_celeba.txt: count, names, then one row of 1/-1 per image."""
    rows = (f"{name} " + " ".join(f"{v:2d}" for v in values) + "\n" for name, values in sorted(attrs.items()))
    (raw / "list_attr_celeba.txt").write_text(f"{len(attrs)}\n" + " ".join(ATTRIBUTE_NAMES) + "\n" + "".join(rows))


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


def fetch_celeba(cfg: Config, raw: Path, workers: int) -> dict:
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
    _copy_celeba_images(files.images, raw / IMAGE_DIR, sorted(partition))
    write_partition(raw, partition)
    write_attrs(raw, attrs)
    if files.identity:
        shutil.copyfile(files.identity, raw / "identity_CelebA.txt")
    counts = [sum(p == k for p in partition.values()) for k in range(3)]
    return {"source": "celeba", "counts": dict(zip(SPLITS, counts))}


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
    available = set(_image_members(files.images))
    absent = sorted(set(partition) - available)
    if absent:
        raise DataError(
            f"{len(absent)} images listed in {files.partition} are not in {files.images} "
            f"(first: {absent[0]}): complete or replace the image folder."
        )


def _image_members(images: Path) -> dict[str, str]:
    """file name -> its name in the folder or zip; DataError for a zip that is not one."""
    if images.is_dir():
        return {name: name for name in os.listdir(images)}
    with open_zip(images) as z:
        return {Path(n).name: n for n in z.namelist() if n.lower().endswith(".jpg")}


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


def _copy_celeba_images(images: Path, dest: Path, names: list[str]) -> None:
    if images.is_dir():
        for name in tqdm(names, desc="fetch: copy", unit="img", mininterval=1):
            shutil.copyfile(images / name, dest / name)
        return
    members = _image_members(images)
    with open_zip(images) as z:
        for name in tqdm(names, desc="fetch: unzip", unit="img", mininterval=1):
            try:
                (dest / name).write_bytes(z.read(members[name]))
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise DataError(
                    f"{images}: member {members[name]} cannot be read ({err}); the zip is damaged: "
                    f"delete it and {_celeba_help(images.parent)}."
                ) from None


# ---------------------------------------------------------------------------------------------
# source: synthetic


def _synthetic_chunk(task: tuple[Path, int, list[int]]) -> list[list[int]]:
    dest, seed, indices = task
    rows = []
    for i in indices:
        image, a = draw_face(random.Random(f"synthetic:{seed}:{i}"))
        image.save(dest / f"{i:06d}.jpg", quality=92)
        rows.append(attribute_row(a))
    return rows


def make_synthetic(cfg: Config, raw: Path, workers: int) -> dict:
    d = cfg.data
    n = d.synthetic_count
    counts = _split_counts(n, d.split_fractions)
    check_split_counts(
        dict(zip(SPLITS, counts)), f"data.synthetic_count={n} with data.split_fractions={list(d.split_fractions)}"
    )
    indices = list(range(1, n + 1))
    chunks = [indices[k : k + 64] for k in range(0, n, 64)]
    attrs: dict[str, list[int]] = {}
    with (
        multiprocessing.get_context("fork").Pool(workers) as pool,
        tqdm(total=n, desc="fetch: draw", unit="img", mininterval=1) as bar,
    ):
        for chunk, rows in zip(chunks, pool.imap(_synthetic_chunk, [(raw / IMAGE_DIR, d.seed, c) for c in chunks])):
            attrs.update({f"{i:06d}.jpg": row for i, row in zip(chunk, rows)})
            bar.update(len(chunk))
    partition = {f"{i:06d}.jpg": 0 if i <= counts[0] else 1 if i <= counts[0] + counts[1] else 2 for i in indices}
    write_partition(raw, partition)  # consecutive id ranges, as CelebA's partition
    write_attrs(raw, attrs)
    return {
        "source": "synthetic",
        "note": "procedurally drawn faces, not CelebA: for demos and tests",
        "seed": d.seed,
        "count": n,
        "counts": dict(zip(SPLITS, counts)),
        "attributes_by_construction": list(SYNTHETIC_ATTRIBUTES),
    }


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """train/val/test sizes from fractions, each split at least 1 image when fraction > 0."""
    val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
    return [n - val - test, val, test]


# ---------------------------------------------------------------------------------------------
# source: folder


# An ImageFolder-style layout: these top-level folder names are the splits, honoured as they are.
SPLIT_FOLDERS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def folder_split(root: Path, files: list[Path]) -> str:
    """ "folders" when every image lies under a top-level train/, val/ (valid/, validation/) or test/
    folder, with train and val or test present; otherwise "hash"."""
    tops = {p.relative_to(root).parts[0].lower() if len(p.relative_to(root).parts) > 1 else "" for p in files}
    present = {SPLIT_FOLDERS.get(t) for t in tops}
    if tops <= set(SPLIT_FOLDERS) and 0 in present and present & {1, 2}:
        return "folders"
    return "hash"


def copy_folder(cfg: Config, raw: Path, workers: int) -> dict:
    """data.folder_dir -> raw copies; a file's split follows from its content (sha256 of its bytes),
    so identical images always share a split (or, where the user's own train/val/test folders put
    copies in different splits, are reported and left where the user put them)."""
    d = cfg.data
    root = Path(d.folder_dir)
    if not d.folder_dir or not root.is_dir():
        raise DataError(f"data.folder_dir={d.folder_dir!r} is not a folder: set it to the folder of your images.")
    listing = list_folder(root)
    files = listing.images
    if not files:
        raise DataError(
            f"no image files under {root} ({len(listing.skipped)} other files, read: "
            f"{'/'.join(sorted(FOLDER_SUFFIXES))}): put your images there."
        )
    split_by = folder_split(root, files)
    width = max(6, len(str(len(files))))
    partition, sources, by_content = {}, {}, defaultdict(list)
    user_splits = (
        {SPLIT_FOLDERS[p.relative_to(root).parts[0].lower()] for p in files} if split_by == "folders" else set()
    )
    carved = {k for k in (1, 2) if split_by == "folders" and k not in user_splits}
    for i, path in enumerate(tqdm(files, desc="fetch: copy", unit="img", mininterval=1), start=1):
        rel = path.relative_to(root).as_posix()
        suffix = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
        name = f"{i:0{width}d}{suffix}"
        content = path.read_bytes()
        (raw / IMAGE_DIR / name).write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        if split_by == "folders":
            partition[name] = _carve(
                SPLIT_FOLDERS[rel.split("/")[0].lower()], carved, d.seed, digest, d.split_fractions
            )
        else:
            partition[name] = _hash_split(d.seed, digest, d.split_fractions)
        sources[name] = rel
        by_content[digest].append(name)
    counts = [sum(p == k for p in partition.values()) for k in range(3)]
    how = (
        "the folder's own train/val/test folders"
        if split_by == "folders"
        else f"data.split_fractions={list(d.split_fractions)}"
    )
    check_split_counts(dict(zip(SPLITS, counts)), f"{len(files)} images in {root}, split by {how}")
    duplicates = _duplicates(by_content, partition, sources)
    report = {
        "skipped": [{"file": p.relative_to(root).as_posix(), "reason": r} for p, r in listing.skipped],
        "duplicates": duplicates,
        "links_followed": listing.links_followed,
        "carved": [_carve_note(k, d.split_fractions) for k in carved],
    }
    _say_folder(root, listing, duplicates, report["carved"])
    write_partition(raw, partition)
    (raw / SOURCE_FILES).write_text(json.dumps(sources, indent=0, sort_keys=True) + "\n")
    (raw / FETCH_REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return {
        "source": "folder",
        "folder_dir": d.folder_dir,
        "count": len(files),
        "counts": dict(zip(SPLITS, counts)),
        "split": split_by,
        "split_key": "sha256 of the file's bytes",
        "skipped": len(listing.skipped),
        "links_followed": listing.links_followed,
        "duplicates": {
            "groups": len(duplicates),
            "extra_copies": sum(len(g["files"]) - 1 for g in duplicates),
            "groups_across_splits": sum(len(set(g["splits"])) > 1 for g in duplicates),
        },
        "carved": report["carved"],
    }


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


def _duplicates(by_content: dict[str, list[str]], partition: dict[str, int], sources: dict[str, str]) -> list[dict]:
    return [
        {"sha256": digest, "files": [sources[n] for n in names], "splits": [SPLITS[partition[n]] for n in names]}
        for digest, names in sorted(by_content.items())
        if len(names) > 1
    ]


def _say_folder(root: Path, listing: FolderListing, duplicates: list[dict], carved: list[str]) -> None:
    """One line each for what the user should know: skipped files, duplicates across splits, a carved split."""
    if listing.skipped:
        reasons = Counter(r.split(":")[0].split(" (")[0] for _, r in listing.skipped)
        summary = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        _warn(f"{len(listing.skipped)} files under {root} are not images read here ({summary}): report.json lists each")
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

SOURCES = {"celeba": fetch_celeba, "synthetic": make_synthetic, "folder": copy_folder}


def fetch(cfg: Config, workers: int | None = None) -> dict:
    """Rewrite data.raw_dir from data.source; returns what dataset.json says about it.

    workers: processes for drawing synthetic faces (default: all available cores); copying
    CelebA or a folder is one process, bound by the disk.
    """
    d = cfg.data
    if not math.isclose(sum(d.split_fractions), 1.0) or min(d.split_fractions) < 0:
        raise DataError(f"data.split_fractions={list(d.split_fractions)} must be three fractions >= 0 that sum to 1.")
    target = Path(d.raw_dir)
    inputs = {"celeba": d.celeba_dir, "folder": d.folder_dir}.get(d.source)
    _check_not_inputs(target, Path(inputs) if inputs else None)
    raw = staging_dir(target, (DATASET_FILE,))  # replaces raw_dir only when complete
    (raw / IMAGE_DIR).mkdir()
    try:
        info = SOURCES[d.source](cfg, raw, workers or len(os.sched_getaffinity(0)))
    except BaseException as err:  # the previous copy stays; nothing half-written is left
        shutil.rmtree(raw, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(disk_full_message(raw.parent, _source_bytes(cfg), "a copy of the images")) from None
        raise
    digest = source_digest(cfg)  # after a download, too
    (raw / DATASET_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    if digest is not None:
        (raw / INVENTORY_FILE).write_text(json.dumps({"source": d.source, "sha256": digest}) + "\n")
    swap_in(raw, target)
    return info


DATASET_FILE = "dataset.json"


def _source_bytes(cfg: Config) -> int:
    """About how many bytes fetch copies: the folder's images, CelebA's files, or drawn faces."""
    d = cfg.data
    if d.source == "folder":
        return sum(p.stat().st_size for p in list_folder(Path(d.folder_dir)).images)
    if d.source == "celeba":
        return sum(p.stat().st_size for p in Path(d.celeba_dir).rglob("*") if p.is_file())
    return d.synthetic_count * 20_000  # a 178x218 JPEG at quality 92


INVENTORY_FILE = "source_inventory.json"  # in data.raw_dir; not part of the manifest


def source_digest(cfg: Config) -> str | None:
    """sha256 over (path, size, mtime) of every file of data.celeba_dir or the images of
    data.folder_dir: DVC does not track those folders (they may lie outside the repository), so
    `pipeline.retrain` compares this with what the last fetch read. None for synthetic data, or
    when the folder does not exist."""
    d = cfg.data
    root = Path({"celeba": d.celeba_dir, "folder": d.folder_dir}.get(d.source) or "")
    if d.source == "synthetic" or not str(root) or not root.is_dir():
        return None
    files = list_folder(root).images if d.source == "folder" else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(os.fsencode(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"))
    return digest.hexdigest()


def inputs_changed(cfg: Config) -> str | None:
    """A sentence saying that data.celeba_dir or data.folder_dir changed since the last fetch, or None."""
    current = source_digest(cfg)
    recorded_file = Path(cfg.data.raw_dir) / INVENTORY_FILE
    if current is None or not recorded_file.is_file():
        return None
    recorded = json.loads(recorded_file.read_text())
    if recorded == {"source": cfg.data.source, "sha256": current}:
        return None
    key = "folder_dir" if cfg.data.source == "folder" else "celeba_dir"
    return f"files in data.{key} ({getattr(cfg.data, key)}) were added, removed or changed since the last fetch"


def _check_not_inputs(raw: Path, inputs: Path | None) -> None:
    """Refuse a raw_dir that holds the inputs or the project: replacing it would erase them."""
    target = raw.resolve()
    keep = [Path.cwd().resolve()] + ([inputs.resolve()] if inputs else [])
    if any(target == k or target in k.parents for k in keep):
        raise DataError(
            f"data.raw_dir={raw} holds the project or the input data and would be erased: "
            "give it a folder of its own, such as data/raw."
        )


@command("fetch")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    info = fetch(cfg)
    print(f"fetch: {info['source']} {info.get('counts')} -> {cfg.data.raw_dir}")


if __name__ == "__main__":
    main()
