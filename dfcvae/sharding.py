"""The images fetch inventoried, read where they lie -> webdataset tar shards: the work of the shard stage.

`write_shards(cfg)` reads data.inventory_dir, reads each image from its source (a folder, an
s3:// prefix, CelebA's zip, the face generator), and replaces data.shards_dir whole, a local
folder or any fsspec URL. The new set is written beside the old, in `<shards_dir>.partial`, and
swapped in when complete; a failure leaves the previous set:

    <split>-NNNNNN.tar   up to data.samples_per_shard samples each; the sample format is
                         dfcvae/shards/format.py's
    manifest.json        per-split counts and shards (name, count, sha256), preprocessing,
                         source (celeba | synthetic | folder), raw image counts
    manifest.sha256      sha256 of manifest.json
    report.json          every converted and rejected image, with the reason

The plan. Which image goes into which shard is fixed by the inventory alone: each split's images,
sorted by key, in a seeded order (data.seed: shards are mixtures, so the loader needs only a local
shuffle), cut every data.samples_per_shard. One task writes one shard: it reads its images,
checks each against the inventory's sha256, and writes those it can use. So the shards are
byte-identical whatever the number of workers or machines (fixed tar metadata, no timestamps),
and an image rejected leaves its shard one sample shorter.

Preprocessing: a centre crop (data.crop_size: pixels, "square" = the centre square of the
shorter side, "auto" = square for a folder of your images and CELEBA_CROP px for CelebA's
aligned faces), then resize to data.image_size (bilinear with antialiasing, as torchvision's
Resize on PIL images in PyTorch-VAE). A pixel crop that keeps under a quarter of an image's area
is counted in the manifest and warned about.

Outcomes, each recorded in report.json:
    written     RGB, at least the crop on each side
    converted   grayscale, palette, CMYK, 1-bit, YCbCr or fully opaque alpha -> RGB, then written
    rejected    not an image, truncated or corrupt, transparent pixels (no background is safe
                to assume), 16-bit or float pixels, a side shorter than a pixel crop (or, for
                "square", than data.image_size), more than data.max_image_pixels pixels
An image missing, or whose bytes differ from the inventory's, changed after fetch: the stage
stops and says to run fetch again; it is never silently used or left out. More than
data.max_reject_fraction rejected fails the stage (after writing report.json).

Where it runs (shard.engine): worker processes here, or Ray tasks on the cluster at RAY_ADDRESS
("auto" picks Ray when it is set), each reading its images from the source and writing its shard
straight to the partial set, so the source and data.shards_dir must be reachable from every node
(object storage, or a path every node mounts). A task whose process or node dies is run again
(shard.max_retries). Resumable: each finished shard leaves `<name>.json`, its manifest entry and
report, after its tar; a rerun of the same plan keeps those and writes the rest. The manifest is
assembled when every task is done and lists only finished shards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dfcvae.config import Config, UserError
from dfcvae.files import PLAN, DiskFullError, check_free_space, disk_full_message, staging_dir, swap_in
from dfcvae.images import SMALL_CROP, Rejected, crop_side, load_rgb, preprocess, resolve_crop
from dfcvae.inventory import INVENTORY_FILE, read_dataset, read_report, read_table, rows
from dfcvae.shards.format import (
    ATTRIBUTE_NAMES,
    FORMAT_VERSION,
    SPLITS,
    DataError,
    check_split_counts,
    shard_name,
    write_manifest,
)
from dfcvae.shards.writer import Sample, write_shard
from dfcvae.sources import (
    FolderSource,
    ImageSource,
    filesystem,
    is_url,
    read_many,
    resolved,
    source_from_record,
    source_record,
    strip_scheme,
)

SET_FILES = ("manifest.json", "manifest.sha256", "report.json")  # beside the shards


@dataclass(frozen=True)
class ShardTask:
    """One shard: its name, its images (inventory rows, in order), and how to read and write them."""

    name: str
    images: pa.Table  # the inventory's rows for this shard, in the shard's order (dfcvae.inventory.SCHEMA)
    source: ImageSource
    out: str  # the partial set: a local folder or an fsspec URL
    crop: int | str
    image_size: int
    max_pixels: int
    encoding: str


def plan(cfg: Config, table: pa.Table, source: ImageSource, out: str) -> list[ShardTask]:
    """The shards and their images, from the inventory and the config alone (see the module's doc).
    Works on the inventory's columns, never an object per image: a 10-million-row inventory planned
    in 25 s on one core here (sorting, one shuffled list of ints per split, 5,001 slices)."""
    d = cfg.data
    crop = resolve_crop(d.crop_size, source_record(source)["kind"])
    table = table.sort_by("key")
    splits = table.column("split").to_numpy()
    tasks = []
    for split in range(len(SPLITS)):
        chosen = np.flatnonzero(splits == split).tolist()  # in key order
        random.Random(f"{d.seed}:{SPLITS[split]}").shuffle(chosen)  # a mixture; the same for the same input
        for k, start in enumerate(range(0, len(chosen), d.samples_per_shard)):
            part = table.take(chosen[start : start + d.samples_per_shard])
            name = shard_name(SPLITS[split], k)
            tasks.append(ShardTask(name, part, source, out, crop, d.image_size, d.max_image_pixels, d.encoding))
    return tasks


# What a shard's bytes depend on besides the inventory and the settings: this code, and Pillow's.
SHARD_CODE = (
    "dfcvae.sharding",
    "dfcvae.images",
    "dfcvae.sources",
    "dfcvae.synthetic",
    "dfcvae.shards.format",
    "dfcvae.shards.writer",
)


def plan_digest(cfg: Config, inventory_dir: Path, source: ImageSource) -> str:
    """sha256 over everything a shard's bytes depend on (the inventory file, the source, the data
    settings, the shard format, the code in SHARD_CODE and Pillow's version), so that a resumed
    set is the set planned now."""
    import importlib

    import PIL

    digest = hashlib.sha256()
    with open(inventory_dir / INVENTORY_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    settings = {"format": FORMAT_VERSION, "source": source_record(source), "pillow": PIL.__version__}
    settings |= {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("inventory_dir", "shards_dir")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for module in SHARD_CODE:
        digest.update(Path(importlib.import_module(module).__file__).read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# One task (module-level, so worker processes and Ray tasks can run it)


def write_planned(task: ShardTask) -> dict:
    """Read, check and write one shard; returns its record (also left as `<name>.json` beside it):
    {"entry": manifest entry, "in": images, "converted": [...], "rejected": [...], "small": [...]}.
    DataError when an image is gone or changed since fetch."""
    if _exists(task.out, f"{task.name}.json") and _exists(task.out, task.name):  # an earlier attempt's, same plan
        return json.loads(_read_text(task.out, f"{task.name}.json"))
    _check_reachable(task)
    listed: dict[str, list] = {"converted": [], "rejected": []}
    small: list[float] = []
    images = rows(task.images)

    def samples() -> Iterator[Sample]:
        for row, data in zip(images, read_many(task.source, [r.path for r in images])):
            if isinstance(data, FileNotFoundError) or (
                isinstance(data, bytes) and row.sha256 is not None and hashlib.sha256(data).digest() != row.sha256
            ):
                what = "is gone" if isinstance(data, FileNotFoundError) else "has changed"
                raise DataError(
                    f"{task.source.location(row.path)} {what} since fetch listed it: run `dvc repro -f fetch` "
                    "(or python -m pipeline.fetch) to take the source as it is now, then shard again."
                )
            if isinstance(data, DataError):
                raise data
            if isinstance(data, BaseException):
                raise DataError(
                    f"{task.source.location(row.path)} cannot be read ({type(data).__name__}: {data}): "
                    "check the source and run shard again."
                ) from data
            try:
                rgb, note = load_rgb(data, task.crop, task.max_pixels, task.image_size)
            except Rejected as e:
                listed["rejected"].append({"file": row.path, "split": row.split_name, "reason": str(e)})
                continue
            kept = crop_side(rgb, task.crop) ** 2 / (rgb.width * rgb.height)
            if kept < SMALL_CROP:
                small.append(kept)
            if note:
                listed["converted"].append({"file": row.path, "split": row.split_name, "reason": note})
            attrs = list(row.attrs) if row.attrs is not None else None
            yield Sample(row.key, preprocess(rgb, task.crop, task.image_size), attrs, row.identity)

    if is_url(task.out):
        with tempfile.TemporaryDirectory() as tmp:
            entry = write_shard(Path(tmp) / task.name, samples(), task.encoding)
            filesystem(task.out).put_file(str(Path(tmp) / task.name), f"{strip_scheme(task.out)}/{task.name}")
    else:
        entry = write_shard(Path(task.out) / task.name, samples(), task.encoding)
    record = {"entry": entry, "in": len(images), **listed, "small": small, "node": _node()}
    _write_text(task.out, f"{task.name}.json", json.dumps(record, sort_keys=True))  # last: the shard is done
    return record


def _node() -> str:
    """Where this task runs: its Ray node's address, or this machine's name."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    return socket.gethostname()


def _exists(out: str, name: str) -> bool:
    return filesystem(out).exists(f"{strip_scheme(out)}/{name}") if is_url(out) else (Path(out) / name).is_file()


def _read_text(out: str, name: str) -> str:
    if is_url(out):
        return filesystem(out).cat_file(f"{strip_scheme(out)}/{name}").decode()
    return (Path(out) / name).read_text()


def _write_text(out: str, name: str, text: str) -> None:
    """Whole or not at all: an object store's put, or a local write renamed into place."""
    if is_url(out):
        filesystem(out).pipe_file(f"{strip_scheme(out)}/{name}", text.encode())
        return
    tmp = Path(out) / f"{name}.tmp"
    tmp.write_text(text)
    tmp.rename(Path(out) / name)


# ---------------------------------------------------------------------------------------------
# Engines: where the tasks run


def engine(cfg: Config) -> str:
    return ("ray" if os.environ.get("RAY_ADDRESS") else "local") if cfg.shard.engine == "auto" else cfg.shard.engine


def run_tasks(cfg: Config, tasks: list[ShardTask]) -> Iterator[dict]:
    """Each task's record as it finishes, on shard.engine. A task's UserError or OSError is raised
    here as it is; a worker process that died (killed, out of memory) is one sentence."""
    if not tasks:
        return
    if engine(cfg) == "ray":
        yield from _run_on_ray(cfg, tasks)
        return
    workers = min(cfg.shard.workers or len(os.sched_getaffinity(0)), len(tasks))
    if workers == 1:
        yield from map(write_planned, tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(write_planned, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            raise DataError(
                RETRY_ADVICE.format(what="a shard worker process died (killed, or out of memory)")
            ) from None
        finally:
            for future in futures:
                future.cancel()


RETRY_ADVICE = "{what}: run shard again; the shards already finished are kept and only the rest are written."


def _run_on_ray(cfg: Config, tasks: list[ShardTask]) -> Iterator[dict]:
    """Ray tasks, shard.workers (default: the cluster's CPUs) at a time, each run again
    shard.max_retries times when its worker process or node dies."""
    import ray

    from dfcvae.cluster import init_ray

    init_ray()
    cpus = max(1.0, ray.cluster_resources().get("CPU", 1.0))
    workers = cfg.shard.workers or int(cpus)
    remote = ray.remote(write_planned).options(
        num_cpus=min(1.0, cpus / workers), max_retries=cfg.shard.max_retries, retry_exceptions=False
    )
    pending, queue = [], list(tasks)
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                pending.append(remote.remote(queue.pop(0)))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (UserError, OSError)):
            raise err.cause from None
        raise DataError(RETRY_ADVICE.format(what=f"a shard task failed ({_first_line(err.cause or err)})")) from err
    except ray.exceptions.RayError as err:  # a worker or node lost more than shard.max_retries times
        what = f"a shard task was lost {cfg.shard.max_retries + 1} times ({_first_line(err)})"
        raise DataError(RETRY_ADVICE.format(what=what)) from None
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# The stage


def write_shards(cfg: Config) -> dict:
    """Shard the images data.inventory_dir lists into data.shards_dir; returns the manifest.

    Raises DataError when an image changed since fetch, or when more than
    data.max_reject_fraction of the images are rejected (report.json in the partial set says
    which and why); DiskFullError when the disk holding a local data.shards_dir cannot take the
    set. An interrupted run (a failure, ^C) leaves its finished shards for the next to reuse."""
    d = cfg.data
    if min(d.image_size, d.samples_per_shard) < 1 or min(cfg.shard.workers, cfg.shard.max_retries) < 0:
        raise DataError(
            f"data.image_size={d.image_size} and data.samples_per_shard={d.samples_per_shard} must be positive, and "
            f"shard.workers={cfg.shard.workers} and shard.max_retries={cfg.shard.max_retries} 0 or more: "
            "fix params.yaml."
        )
    inventory_dir, out = Path(d.inventory_dir), d.shards_dir
    if not is_url(out) and (
        Path(out).resolve() == inventory_dir.resolve() or Path(out).resolve() in inventory_dir.resolve().parents
    ):
        raise DataError(f"data.shards_dir={out} holds data.inventory_dir and would erase it: give it its own folder.")
    table = read_table(inventory_dir)
    info = read_dataset(inventory_dir)
    source = resolved(source_from_record(info["read_from"]))
    check_source(source)
    _say_stale_copy(inventory_dir)
    remote = is_url(out)
    staging = _remote_staging(out) if remote else str(Path(out).resolve().with_name(Path(out).name + ".partial"))
    digest = plan_digest(cfg, inventory_dir, source)
    if remote:
        _check_remote_prefix(out)
        _prepare_remote(staging, digest)
    else:
        staging_dir(Path(out), ("manifest.json", "report.json"), resume=digest)
        check_free_space(Path(staging), _set_bytes(cfg, table.num_rows), "the shards")
    tasks = plan(cfg, table, source, staging)
    try:
        records = _run_all(cfg, tasks, table.num_rows)
        manifest, report = _assemble(cfg, info, table, tasks, records, read_report(inventory_dir))
    except BaseException as err:
        if not remote:  # a shard cut short is never kept; finished ones are, for the next run
            for tmp in Path(staging).glob("*.tmp"):
                tmp.unlink()
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            needed = _set_bytes(cfg, table.num_rows)
            raise DiskFullError(disk_full_message(Path(staging), needed, "the shards")) from None
        raise
    listed = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    if remote:
        _swap_remote(staging, out, manifest, listed)
        return manifest
    local = Path(staging)
    absent = [name for name in listed if not (local / name).is_file()]
    if absent:  # written by a task on another node, to its own disk
        raise DataError(
            f"{len(absent)} shards that tasks reported finished are not in {local} (such as {absent[0]}): on a "
            "cluster of several nodes, data.shards_dir must be an s3:// prefix or a path every node mounts."
        )
    for name in [t.name for t in tasks]:  # the done records, and the empty shards no split lists
        (local / f"{name}.json").unlink(missing_ok=True)
    for tar in [*local.glob("*.tar"), *local.glob("*.tmp")]:
        if tar.name not in listed:
            tar.unlink()
    (local / PLAN).unlink(missing_ok=True)
    write_manifest(local, manifest)
    swap_in(local, Path(out))
    return manifest


def check_source(source: ImageSource) -> None:
    """DataError in one sentence when the source the inventory names is not there at all (a local
    path that is gone, or relative to another folder): not the same as an image changed."""
    where = source.root if isinstance(source, FolderSource) else getattr(source, "images", None)
    if where is None or is_url(where) or os.path.exists(where.removeprefix("file://")):
        return
    raise DataError(
        f"{where}, the source that fetch listed, is not there (on {socket.gethostname()}, in {os.getcwd()}): "
        "run shard where the source is, give data.celeba_dir or data.folder_dir as an absolute path every "
        "node mounts (or an s3:// URL) and run fetch again."
    )


def _check_reachable(task: ShardTask) -> None:
    """In a task, perhaps on another node: the source and the partial set must be there too."""
    check_source(task.source)
    if not is_url(task.out) and not os.path.isdir(task.out):
        raise DataError(
            f"{task.out} is not there on {socket.gethostname()}: on a cluster of several nodes, "
            "data.shards_dir must be an s3:// prefix or a path every node mounts."
        )


def _run_all(cfg: Config, tasks: list[ShardTask], total: int) -> dict[str, dict]:
    """Every task's record by shard name, with a progress bar of images done (rate and ETA)."""
    records = {}
    where = f"Ray, {cfg.shard.workers or 'all'} at a time" if engine(cfg) == "ray" else "local processes"
    with tqdm(total=total, desc=f"shard ({where})", unit="img", mininterval=1, smoothing=0.1) as bar:
        for record in run_tasks(cfg, tasks):
            records[record["entry"]["name"]] = record
            bar.update(record["in"])
    nodes = Counter(r.get("node", "?") for r in records.values())
    print(
        f"shard: {len(records)} shards written on {len(nodes)} node{'s' * (len(nodes) != 1)} ({_counts(nodes)})",
        file=sys.stderr,
        flush=True,
    )
    return records


def _counts(nodes: Counter) -> str:
    return ", ".join(f"{node}: {n}" for node, n in sorted(nodes.items()))


def _set_bytes(cfg: Config, count: int) -> int:
    """About how many bytes `count` samples take: raw pixels, the tar headers and the attributes."""
    return count * (cfg.data.image_size**2 * 3 + 3 * 512)


def _assemble(
    cfg: Config, info: dict, table: pa.Table, tasks: list[ShardTask], records: dict[str, dict], fetch_report: dict
) -> tuple[dict, dict]:
    """The manifest and report.json from every task's record; DataError for too many rejections
    or a split left empty (report.json is written first, into the partial set)."""
    d = cfg.data
    converted = [c for t in tasks for c in records[t.name]["converted"]]
    rejected = [c for t in tasks for c in records[t.name]["rejected"]]
    counts = {
        "in": table.num_rows,
        "written": table.num_rows - len(rejected),
        "converted": len(converted),
        "rejected": len(rejected),
    }
    report = {"counts": counts, "converted": converted, "rejected": rejected, "fetch": fetch_report}
    _write_text(tasks[0].out, "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    small = [k for t in tasks for k in records[t.name]["small"]]
    if small:
        warn_small_crops(small, table.num_rows, tasks[0].crop)
    if counts["rejected"] > d.max_reject_fraction * counts["in"]:
        raise DataError(
            f"{counts['rejected']} of {counts['in']} images were rejected, more than "
            f"data.max_reject_fraction={d.max_reject_fraction}: see {tasks[0].out}/report.json for why, "
            "then fix or remove those images (or raise the fraction); the previous shards are kept."
        )
    splits = {}
    for split in SPLITS:
        shards = [records[t.name]["entry"] for t in tasks if t.name.startswith(split + "-")]
        shards = [s for s in shards if s["count"] > 0]
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}
    check_split_counts(
        {s: splits[s]["count"] for s in SPLITS},
        f"after {counts['rejected']} rejections (report.json), {counts['written']} usable images",
    )
    crop = tasks[0].crop
    manifest = {
        "format": FORMAT_VERSION,
        "source": info["source"],
        "synthetic": info["source"] == "synthetic",
        "dataset": {k: v for k, v in info.items() if k != "read_from"},
        "attributes": list(ATTRIBUTE_NAMES) if table.column("attrs").null_count < table.num_rows else [],
        "preprocessing": {
            "crop_size": d.crop_size,
            "crop": crop if crop == "square" else f"{crop} px",
            "images_with_crop_under_quarter_area": len(small),
            "image_size": d.image_size,
            "resize": "bilinear, antialiased",
            "encoding": d.encoding,
            "order_seed": d.seed,
        },
        "raw": counts,
        "splits": splits,
    }
    return manifest, report


def warn_small_crops(small: list[float], total: int, crop: int | str) -> None:
    """A warning naming how many images the crop keeps under SMALL_CROP of, and the fix."""
    print(
        f"shard: WARNING: data.crop_size={crop} keeps under {SMALL_CROP:.0%} of the area of {len(small)} of "
        f"{total} images (as little as {min(small):.1%}): the model sees only their centres. For "
        "photographs of any size set data.crop_size: square (or auto).",
        file=sys.stderr,
        flush=True,
    )


def _say_stale_copy(inventory_dir: Path) -> None:
    """An older fetch's copy of the images (data/raw) is read by nothing now: say what it holds."""
    old = inventory_dir.with_name("raw")
    if (old / "img_align_celeba").is_dir():
        print(
            f"shard: {old} is a copy of the images an older fetch made; nothing reads it now: delete it.",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# A set in object storage


def _remote_staging(out: str) -> str:
    return out.rstrip("/") + ".partial"


def _prepare_remote(staging: str, digest: str) -> None:
    """The partial set's prefix, kept when it holds this plan's work, else emptied."""
    fs, base = filesystem(staging), strip_scheme(staging)
    fs.invalidate_cache(base)
    if fs.exists(f"{base}/{PLAN}") and fs.cat_file(f"{base}/{PLAN}").decode() == digest:
        return
    if fs.exists(base):
        fs.rm(base, recursive=True)
    fs.pipe_file(f"{base}/{PLAN}", digest.encode())


SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")  # format.shard_name's


def _check_remote_prefix(out: str) -> list[str]:
    """The keys under out (before any work): UserError when one is not a file of a shard set, which
    replacing the set would delete."""
    fs, dst = filesystem(out), strip_scheme(out)
    fs.invalidate_cache(dst)  # listings this process cached may be stale: others write the bucket too
    existing = [k for k in (fs.find(dst) if fs.exists(dst) else []) if k != dst]
    ours = [k for k in existing if "/" not in k[len(dst) + 1 :]]
    foreign = [
        k
        for k in existing
        if k not in ours or not (SHARD_NAME.match(k.rsplit("/", 1)[-1]) or k.rsplit("/", 1)[-1] in SET_FILES)
    ]
    if foreign:
        raise UserError(
            f"{out} holds objects this project did not write (such as {foreign[0]}), and the stage replaces "
            "the whole set: point data.shards_dir at a prefix of its own."
        )
    return existing


def _swap_remote(staging: str, out: str, manifest: dict, listed: list[str]) -> None:
    """Copy the finished set into out's prefix (server-side copies), the manifest last, then remove
    the old set's other shards and the partial prefix. Not atomic as a folder's rename is: from
    the first copy until the manifest is written, out has no manifest, which the loader refuses in
    one sentence. A failure there leaves the partial prefix whole, and running shard again finishes
    the copy without writing any shard again."""
    fs, src, dst = filesystem(out), strip_scheme(staging), strip_scheme(out)
    existing = _check_remote_prefix(out)
    if fs.exists(f"{dst}/manifest.json"):
        fs.rm(f"{dst}/manifest.json")  # no manifest lists a shard while it is being replaced
    for name in listed:
        fs.copy(f"{src}/{name}", f"{dst}/{name}")
    fs.copy(f"{src}/report.json", f"{dst}/report.json")
    with tempfile.TemporaryDirectory() as tmp:
        write_manifest(Path(tmp), manifest)
        fs.put_file(f"{tmp}/manifest.sha256", f"{dst}/manifest.sha256")
        fs.put_file(f"{tmp}/manifest.json", f"{dst}/manifest.json")
    for key in existing:
        if SHARD_NAME.match(key.rsplit("/", 1)[-1]) and key.rsplit("/", 1)[-1] not in listed:
            fs.rm(key)
    fs.rm(src, recursive=True)
