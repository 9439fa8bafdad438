"""Stage `shard`: the raw dataset (CelebA's layout, from `fetch`) -> webdataset tar shards.

`write_shards(cfg)` reads data.raw_dir and replaces data.shards_dir whole (written beside it in
`<shards_dir>.partial/`, swapped in when complete; a failure leaves the previous set):

    <split>-NNNNNN.tar   data.samples_per_shard samples each (the last of a split may hold fewer);
                         the sample format is dfcvae/shards/format.py's
    manifest.json        per-split counts and shards (name, count, sha256), preprocessing,
                         source (celeba | synthetic | folder), raw image counts
    manifest.sha256      sha256 of manifest.json
    report.json          every converted and rejected raw image, with the reason

Preprocessing: a centre crop (data.crop_size: pixels, "square" = the centre square of the
shorter side, "auto" = square for a folder of your images and CELEBA_CROP px for CelebA's
aligned faces), then resize to data.image_size (bilinear with antialiasing, as torchvision's
Resize on PIL images in PyTorch-VAE). The manifest records the crop; a pixel crop that keeps
under a quarter of an image's area is counted there and warned about (a fixed 148 px crop of
a 1024 px photograph keeps 2% of it).

Raw images are checked first, in parallel over all cores. Outcomes, each recorded in report.json:
    written     RGB, at least the crop on each side
    converted   grayscale, palette, CMYK, 1-bit, YCbCr or fully opaque alpha -> RGB, then written
    rejected    missing file, not an image, truncated or corrupt, transparent pixels (no
                background is safe to assume), 16-bit or float pixels, a side shorter than
                a pixel crop (or, for "square", than data.image_size), more than
                data.max_image_pixels pixels (decompression bombs)
Images in = images written + images rejected. More than data.max_reject_fraction rejected fails
the stage (after writing report.json). The accepted images of each split are written in a
seeded order (data.seed), so shards are mixtures and the loader only needs a local shuffle.
Output is byte-identical on reruns: sorted inputs, fixed tar member metadata, no timestamps.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dfcvae.config import Config
from dfcvae.files import DiskFullError, check_free_space, disk_full_message, staging_dir, swap_in
from dfcvae.images import (
    FETCH_REPORT,
    SMALL_CROP,
    SOURCE_FILES,
    Rejected,
    crop_side,
    load_rgb,
    preprocess,
    resolve_crop,
)
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
from pipeline.common import command, parse_config

CHECK_CHUNK = 256  # images per task in the check pass


@dataclass(frozen=True)
class RawImage:
    id: str  # key in the shards: the file name without extension
    file: str  # name under img_align_celeba/
    split: str
    attrs: list[int] | None  # 0/1 in ATTRIBUTE_NAMES order
    identity: int | None


# ---------------------------------------------------------------------------------------------
# Reading the raw layout


def read_raw(raw_dir: Path) -> tuple[dict, list[RawImage]]:
    """dataset.json and the images listed in list_eval_partition.txt, sorted by file name."""
    info_path, partition_path = raw_dir / "dataset.json", raw_dir / "list_eval_partition.txt"
    if not info_path.is_file() or not partition_path.is_file():
        raise DataError(f"{raw_dir} has no dataset.json or list_eval_partition.txt: run `dvc repro fetch` first.")
    info = json.loads(info_path.read_text())
    partition = {}
    for line in partition_path.read_text().splitlines():
        if line.strip():
            name, part = line.split()
            partition[name] = SPLITS[int(part)]
    attrs = _read_attr_file(raw_dir / "list_attr_celeba.txt")
    identity = _read_pairs(raw_dir / "identity_CelebA.txt")
    if attrs is not None and set(attrs) != set(partition):
        raise DataError(
            f"list_attr_celeba.txt and list_eval_partition.txt in {raw_dir} list different images: "
            "re-run `dvc repro fetch`."
        )
    images = [
        RawImage(Path(name).stem, name, split, attrs[name] if attrs else None, identity.get(name))
        for name, split in sorted(partition.items())
    ]
    return info, images


def _read_attr_file(path: Path) -> dict[str, list[int]] | None:
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if tuple(lines[1].split()) != ATTRIBUTE_NAMES:
        raise DataError(f"{path}: line 2 must be CelebA's 40 attribute names in order: re-run `dvc repro fetch`.")
    return {row[0]: [int(v == "1") for v in row[1:]] for row in (line.split() for line in lines[2:] if line.strip())}


def _read_pairs(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {name: int(value) for name, value in rows}


# ---------------------------------------------------------------------------------------------
# Workers (module-level so multiprocessing can run them)


def _check(task: tuple[Path, list[str], int | str, int, int]) -> list[tuple[str, str, float]]:
    """-> [(outcome, note, area kept)] per file: ("written" | "converted" | "rejected", reason or
    conversion, the fraction of the image's area the crop keeps (1.0 for a rejected image))."""
    image_dir, files, crop, max_pixels, image_size = task
    out = []
    for name in files:
        try:
            img, note = load_rgb(image_dir / name, crop, max_pixels, image_size)
            kept = crop_side(img, crop) ** 2 / (img.width * img.height)
            out.append(("converted", note, kept) if note else ("written", "", kept))
        except Rejected as e:
            out.append(("rejected", str(e), 1.0))
    return out


def _write_shard(task: tuple[Path, Path, str, list[RawImage], int, int, int, str]) -> dict:
    image_dir, out_dir, name, images, crop, image_size, max_pixels, encoding = task

    def samples():
        for image in images:
            try:
                rgb, _ = load_rgb(image_dir / image.file, crop, max_pixels, image_size)
            except Rejected as e:
                raise DataError(f"{image.file} changed while sharding ({e}): re-run the stage.") from None
            yield Sample(image.id, preprocess(rgb, crop, image_size), image.attrs, image.identity)

    return write_shard(out_dir / name, samples(), encoding)


# ---------------------------------------------------------------------------------------------
# The stage


def write_shards(cfg: Config, workers: int | None = None) -> dict:
    """Shard data.raw_dir into data.shards_dir; returns the manifest.

    The new set is written beside the old, in `<shards_dir>.partial/`, and swapped in only when
    complete: a failure (too many rejections, a full disk, an interruption) leaves the previous
    set whole, and the failed attempt's report.json in the .partial folder.
    workers: processes (default: all available cores). Raises DataError when more than
    data.max_reject_fraction of the raw images are rejected (report.json says which and why),
    DiskFullError when the disk holding data.shards_dir cannot take the new set.
    """
    d = cfg.data
    if min(d.image_size, d.samples_per_shard) < 1:
        raise DataError("data.image_size and data.samples_per_shard must be positive.")
    raw_dir, out_dir = Path(d.raw_dir), Path(d.shards_dir)
    if out_dir.resolve() == raw_dir.resolve() or out_dir.resolve() in raw_dir.resolve().parents:
        raise DataError(f"data.shards_dir={out_dir} holds data.raw_dir and would erase it: give it its own folder.")
    info, images = read_raw(raw_dir)
    staging = staging_dir(out_dir, ("manifest.json", "report.json"))
    try:
        manifest = _write_set(cfg, info, images, raw_dir, staging, workers or len(os.sched_getaffinity(0)))
    except BaseException as err:
        for tar in staging.glob("*.tar*"):  # keep report.json, drop what was written
            tar.unlink()
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(disk_full_message(staging, _set_bytes(cfg, len(images)), "the shards")) from None
        raise
    swap_in(staging, out_dir)
    return manifest


def _set_bytes(cfg: Config, count: int) -> int:
    """About how many bytes `count` samples take: raw pixels, the tar headers and the sidecar."""
    return count * (cfg.data.image_size**2 * 3 + 3 * 512)


def _write_set(cfg: Config, info: dict, images: list[RawImage], raw_dir: Path, out_dir: Path, workers: int) -> dict:
    d = cfg.data
    crop = resolve_crop(d.crop_size, info["source"])
    image_dir = raw_dir / "img_align_celeba"
    check_free_space(out_dir, _set_bytes(cfg, len(images)), "the shards")
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        outcomes = _check_all(pool, image_dir, images, crop, cfg)
        report = _report(images, outcomes, _read_json(raw_dir / SOURCE_FILES))
        report["fetch"] = _read_json(raw_dir / FETCH_REPORT)
        small = warn_small_crops(outcomes, crop)
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        counts = report["counts"]
        if counts["rejected"] > d.max_reject_fraction * counts["in"]:
            raise DataError(
                f"{counts['rejected']} of {counts['in']} raw images were rejected, more than "
                f"data.max_reject_fraction={d.max_reject_fraction}: see {out_dir / 'report.json'} for why, "
                "then fix or remove those images (or raise the fraction); the previous shards are kept."
            )
        accepted = [im for im, (outcome, _, _) in zip(images, outcomes) if outcome != "rejected"]
        check_split_counts(
            {s: sum(im.split == s for im in accepted) for s in SPLITS},
            f"after {counts['rejected']} rejections (report.json), {len(accepted)} usable raw images",
        )
        splits = _write_all(pool, image_dir, out_dir, accepted, crop, cfg)
    manifest = {
        "format": FORMAT_VERSION,
        "source": info["source"],
        "synthetic": info["source"] == "synthetic",
        "dataset": info,
        "attributes": list(ATTRIBUTE_NAMES) if any(im.attrs for im in images) else [],
        "preprocessing": {
            "crop_size": d.crop_size,
            "crop": crop if crop == "square" else f"{crop} px",
            "images_with_crop_under_quarter_area": small,
            "image_size": d.image_size,
            "resize": "bilinear, antialiased",
            "encoding": d.encoding,
            "order_seed": d.seed,
        },
        "raw": counts,
        "splits": splits,
    }
    write_manifest(out_dir, manifest)
    return manifest


def warn_small_crops(outcomes: list[tuple[str, str, float]], crop: int | str) -> int:
    """How many usable images the crop keeps under SMALL_CROP of; a warning names them and the fix."""
    small = [kept for outcome, _, kept in outcomes if outcome != "rejected" and kept < SMALL_CROP]
    if small:
        print(
            f"shard: WARNING: data.crop_size={crop} keeps under {SMALL_CROP:.0%} of the area of {len(small)} of "
            f"{len(outcomes)} images (as little as {min(small):.1%}): the model sees only their centres. For "
            "photographs of any size set data.crop_size: square (or auto).",
            file=sys.stderr,
            flush=True,
        )
    return len(small)


def _check_all(
    pool, image_dir: Path, images: list[RawImage], crop: int | str, cfg: Config
) -> list[tuple[str, str, float]]:
    files = [im.file for im in images]
    tasks = [
        (image_dir, files[i : i + CHECK_CHUNK], crop, cfg.data.max_image_pixels, cfg.data.image_size)
        for i in range(0, len(files), CHECK_CHUNK)
    ]
    outcomes = []
    with tqdm(total=len(files), desc="shard: check", unit="img", mininterval=1) as bar:
        for chunk in pool.imap(_check, tasks):
            outcomes += chunk
            bar.update(len(chunk))
    return outcomes


def _read_json(path: Path) -> dict:
    """A JSON file that fetch writes for data.source: folder only ({} for other sources)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _report(images: list[RawImage], outcomes: list[tuple[str, str, float]], sources: dict[str, str]) -> dict:
    counts = {"in": len(images), "written": 0, "converted": 0, "rejected": 0}
    listed: dict[str, list] = {"converted": [], "rejected": []}
    for image, (outcome, note, _) in zip(images, outcomes):
        counts["rejected" if outcome == "rejected" else "written"] += 1
        if outcome != "written":
            entry = {"file": image.file, "split": image.split, "reason": note}
            if image.file in sources:
                entry["source"] = sources[image.file]  # the user's own file
            listed[outcome].append(entry)
    counts["converted"] = len(listed["converted"])
    return {"counts": counts, **listed}


def _write_all(pool, image_dir: Path, out_dir: Path, accepted: list[RawImage], crop: int | str, cfg: Config) -> dict:
    d = cfg.data
    tasks = []
    for split in SPLITS:
        ids = [im for im in accepted if im.split == split]
        random.Random(f"{d.seed}:{split}").shuffle(ids)  # shards are mixtures; sorted input -> same order
        for k, start in enumerate(range(0, len(ids), d.samples_per_shard)):
            chunk = ids[start : start + d.samples_per_shard]
            tasks.append(
                (image_dir, out_dir, shard_name(split, k), chunk, crop, d.image_size, d.max_image_pixels, d.encoding)
            )
    results = {}
    with tqdm(total=len(accepted), desc="shard: write", unit="img", mininterval=1) as bar:
        for result in pool.imap_unordered(_write_shard, tasks):
            results[result["name"]] = result
            bar.update(result["count"])
    splits = {}
    for split in SPLITS:
        shards = [results[name] for name in sorted(results) if name.startswith(split + "-")]
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}
    return splits


@command("shard")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    manifest = write_shards(cfg)
    counts = {split: manifest["splits"][split]["count"] for split in SPLITS}
    print(f"shard: {counts} ({manifest['source']}) -> {cfg.data.shards_dir}")


if __name__ == "__main__":
    main()
