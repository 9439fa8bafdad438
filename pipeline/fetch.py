"""Stage `fetch`: the raw dataset, in CelebA's official layout, under data.raw_dir.

`fetch(cfg)` rewrites data.raw_dir completely:

    img_align_celeba/NNNNNN.jpg    images (178x218 for CelebA and synthetic; any size for folder)
    list_eval_partition.txt        "NNNNNN.jpg P", P = 0 train, 1 val, 2 test
    list_attr_celeba.txt           count, the 40 names, then "NNNNNN.jpg" and 40 values of 1/-1
                                   (absent for data.source: folder, which has no attributes)
    identity_CelebA.txt            "NNNNNN.jpg ID", when CelebA's file is there
    list_source_files.txt          data.source: folder only: "NNNNNN.ext original/relative/path"
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
    folder     every .jpg/.jpeg/.png/.webp under data.folder_dir (recursive), split into
               train/val/test by a seeded hash of the relative path; no attributes.

The stage does not track the contents of data.celeba_dir or data.folder_dir (they need not
exist for other sources): after changing them, run `dvc repro -f fetch`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from dfcvae.config import Config
from dfcvae.data import ATTRIBUTE_NAMES, SPLITS, DataError, check_split_counts
from pipeline.common import command, parse_config

WIDTH, HEIGHT = 178, 218  # CelebA's aligned images
MARGIN = 40  # synthetic faces are drawn on a larger canvas, rotated, then cropped
IMAGE_DIR = "img_align_celeba"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
FOLDER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


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

# Drawn so that these are true exactly when the attribute is 1; every other column is -1.
SYNTHETIC_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Pale_Skin",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Young",
)
HAIR = {
    "Black_Hair": (25, 20, 18),
    "Brown_Hair": (105, 65, 35),
    "Blond_Hair": (225, 190, 110),
    "Gray_Hair": (170, 170, 172),
    "red": (150, 60, 30),
}
SKIN = [(235, 200, 170), (215, 170, 135), (190, 140, 100), (150, 100, 65), (105, 70, 45)]
PALE = (248, 228, 218)


def sample_attributes(rng: random.Random) -> dict[str, bool]:
    """One face's attributes, with CelebA-like correlations (men bald or bearded, the old grey)."""
    a = {"Male": rng.random() < 0.5, "Young": rng.random() < 0.6}
    a["Wearing_Hat"] = rng.random() < 0.15
    a["Bald"] = a["Male"] and not a["Young"] and not a["Wearing_Hat"] and rng.random() < 0.4
    old_grey = not a["Young"] and rng.random() < 0.5
    colour = "Gray_Hair" if old_grey else rng.choice(["Black_Hair", "Brown_Hair", "Blond_Hair", "red"])
    for name in ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair"):
        a[name] = colour == name and not a["Bald"]
    a["_hair"] = colour
    a["Bangs"] = not a["Bald"] and not a["Wearing_Hat"] and rng.random() < 0.3
    hairline_shows = not (a["Bald"] or a["Bangs"] or a["Wearing_Hat"])
    a["Receding_Hairline"] = a["Male"] and hairline_shows and rng.random() < 0.25
    a["Sideburns"] = a["Male"] and not a["Bald"] and rng.random() < 0.3
    a["_long_hair"] = not a["Bald"] and rng.random() < (0.8 if not a["Male"] else 0.1)
    a["Smiling"] = rng.random() < 0.5
    a["Mouth_Slightly_Open"] = rng.random() < (0.6 if a["Smiling"] else 0.25)
    a["Eyeglasses"] = rng.random() < 0.2
    a["Narrow_Eyes"] = rng.random() < 0.15
    a["Pale_Skin"] = rng.random() < 0.15
    a["Chubby"] = rng.random() < 0.15
    a["Big_Nose"] = rng.random() < 0.25
    a["Arched_Eyebrows"] = rng.random() < 0.35
    a["Bushy_Eyebrows"] = rng.random() < 0.2
    a["Bags_Under_Eyes"] = rng.random() < (0.6 if not a["Young"] else 0.1)
    beard = a["Male"] and rng.random() < 0.3
    a["Goatee"] = a["Male"] and not beard and rng.random() < 0.15
    a["Mustache"] = a["Male"] and (beard or rng.random() < 0.15)
    a["5_o_Clock_Shadow"] = a["Male"] and not beard and not a["Goatee"] and rng.random() < 0.25
    a["No_Beard"] = not beard and not a["Goatee"]
    a["_beard"] = beard
    a["Heavy_Makeup"] = not a["Male"] and rng.random() < 0.35
    a["Wearing_Lipstick"] = not a["Male"] and (a["Heavy_Makeup"] or rng.random() < 0.3)
    a["Rosy_Cheeks"] = rng.random() < 0.15
    a["Wearing_Earrings"] = not a["Male"] and rng.random() < 0.35
    a["Blurry"] = rng.random() < 0.05
    return a


def draw_face(rng: random.Random) -> tuple[Image.Image, dict[str, bool]]:
    """A 178x218 face placed like CelebA's aligned crops, and its attributes."""
    a = sample_attributes(rng)
    canvas = _background(rng)  # with a margin, so rotating leaves no empty corners
    draw = ImageDraw.Draw(canvas, "RGBA")  # translucent fills blend
    cx, cy = MARGIN + 89 + rng.gauss(0, 4), MARGIN + 122 + rng.gauss(0, 4)  # face centre: pose varies a little
    half_w = rng.uniform(34, 40) + (7 if a["Chubby"] else 0)
    half_h = rng.uniform(46, 52)
    yaw = rng.uniform(-1, 1)  # turning the head moves the features sideways
    skin = PALE if a["Pale_Skin"] else _jitter(rng, rng.choice(SKIN), 12)
    hair = _jitter(rng, HAIR[a["_hair"]], 15)
    face = (cx, cy, half_w, half_h, yaw)
    _draw_body(draw, rng, face, skin, hair, a)
    _draw_hair(draw, rng, face, hair, a)
    _draw_eyes(draw, rng, face, hair, a)
    _draw_mouth(draw, rng, face, skin, hair, a)
    if a["Wearing_Hat"]:
        _draw_hat(draw, rng, face, hair)
    image = _light(rng, _roll(canvas, rng.uniform(-12, 12), cx, cy))
    return image.filter(ImageFilter.GaussianBlur(2.5) if a["Blurry"] else ImageFilter.BoxBlur(0.5)), a


def _roll(canvas: Image.Image, degrees: float, cx: float, cy: float) -> Image.Image:
    """The WIDTH x HEIGHT window of the canvas, rotated about (cx, cy); nearest, then blurred."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # output pixel (x, y) samples the canvas at R (x + MARGIN - cx, y + MARGIN - cy) + (cx, cy)
    ox, oy = MARGIN - cx, MARGIN - cy
    data = (c, s, c * ox + s * oy + cx, -s, c, -s * ox + c * oy + cy)
    return canvas.transform((WIDTH, HEIGHT), Image.Transform.AFFINE, data, Image.Resampling.NEAREST)


def _jitter(rng: random.Random, colour: tuple, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)


def _background(rng: random.Random) -> Image.Image:
    width, height = WIDTH + 2 * MARGIN, HEIGHT + 2 * MARGIN
    top, bottom = np.array(_random_colour(rng), np.float32), np.array(_random_colour(rng), np.float32)
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(rng.randint(1, 4)):  # clutter: lamps, frames, other heads
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 50)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r * rng.uniform(0.5, 2)), fill=_random_colour(rng) + (rng.randint(60, 200),))
    return image


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def _draw_body(draw, rng, face, skin, hair, a) -> None:
    cx, cy, w, h, _ = face
    if a["_long_hair"]:  # behind everything: shows beside the face and neck
        draw.ellipse((cx - w - 12, cy - h - 10, cx + w + 12, cy + h + 45), fill=hair + (255,))
    draw.ellipse((cx - 85, cy + h + 12, cx + 85, cy + h + 120), fill=_random_colour(rng) + (255,))  # shoulders
    draw.rectangle((cx - 15, cy + h - 15, cx + 15, cy + h + 22), fill=_shade(skin, 0.85))  # neck
    for side in (-1, 1):  # ears, then earrings under them
        draw.ellipse((cx + side * w - 7, cy - 12, cx + side * w + 7, cy + 10), fill=_shade(skin, 0.95))
        if a["Wearing_Earrings"]:
            x = cx + side * w
            draw.ellipse((x - 3, cy + 10, x + 3, cy + 17), fill=(230, 190, 60, 255), outline=(120, 90, 20, 255))
    draw.ellipse((cx - w, cy - h, cx + w, cy + h), fill=skin + (255,))  # face
    if a["Rosy_Cheeks"]:
        for side in (-1, 1):
            x = cx + side * w * 0.55
            draw.ellipse((x - 9, cy + 2, x + 9, cy + 14), fill=(230, 90, 100, 110))


def _shade(colour: tuple, factor: float) -> tuple[int, int, int, int]:
    return tuple(int(min(255, c * factor)) for c in colour[:3]) + (255,)


def _draw_hair(draw, rng, face, hair, a) -> None:
    cx, cy, w, h, _ = face
    if a["Bald"]:
        shine = (255, 255, 255, 90)
        draw.arc((cx - w + 6, cy - h + 4, cx + w - 6, cy - h + 30), 200, 340, fill=shine, width=3)
        return
    hairline = cy - h * (0.78 if a["Receding_Hairline"] else 0.58)
    top = cy - h - 14
    draw.chord((cx - w - 6, top, cx + w + 6, 2 * hairline - top), 180, 360, fill=hair + (255,))
    if a["Sideburns"]:
        for side in (-1, 1):
            x = cx + side * (w - 4)
            draw.rectangle((x - 4, hairline, x + 4, cy + 8), fill=hair + (255,))
    if a["Bangs"]:
        fringe = cy - h * 0.28  # down to just above the eyebrows
        points = [(cx - w - 2, hairline - 4)]
        for k in range(7):  # a jagged edge of locks
            x = cx - w + (k + 0.5) * (2 * w / 7)
            points.append((x, fringe + rng.uniform(-4, 4) + (6 if k % 2 else 0)))
        points.append((cx + w + 2, hairline - 4))
        draw.polygon(points, fill=hair + (255,))


def _draw_eyes(draw, rng, face, hair, a) -> None:
    cx, cy, w, h, yaw = face
    eye_y, shift = cy - 8, yaw * 6
    iris = rng.choice([(70, 45, 25), (60, 110, 160), (70, 120, 70), (40, 30, 25)])
    brow = _shade(hair, 0.6) if a["_hair"] in ("Blond_Hair", "Gray_Hair") else hair + (255,)
    if a["Bald"]:
        brow = (60, 45, 35, 255)
    for side in (-1, 1):
        x = cx + shift + side * w * 0.42
        half_h = 2.2 if a["Narrow_Eyes"] else 4.5
        if a["Heavy_Makeup"]:
            draw.ellipse((x - 10, eye_y - 8, x + 10, eye_y + 2), fill=(120, 60, 140, 150))
        draw.ellipse((x - 8, eye_y - half_h, x + 8, eye_y + half_h), fill=(245, 245, 240, 255))
        r = 3.5 if not a["Narrow_Eyes"] else 2.4
        draw.ellipse((x - r, eye_y - r, x + r, eye_y + r), fill=iris + (255,))
        draw.ellipse((x - 1.3, eye_y - 1.3, x + 1.3, eye_y + 1.3), fill=(10, 10, 10, 255))
        width = 4 if a["Bushy_Eyebrows"] else 2
        if a["Arched_Eyebrows"]:
            draw.arc((x - 11, eye_y - 16, x + 11, eye_y - 2), 200, 340, fill=brow, width=width)
        else:
            draw.line((x - 10, eye_y - 10, x + 10, eye_y - 11), fill=brow, width=width)
        if a["Bags_Under_Eyes"]:
            draw.arc((x - 8, eye_y - 2, x + 8, eye_y + 9), 20, 160, fill=(110, 80, 80, 140), width=2)
        if not a["Young"]:  # crow's feet
            x_out = x + side * 10
            draw.line((x_out, eye_y, x_out + side * 5, eye_y - 3), fill=(90, 60, 50, 150), width=1)
            draw.line((x_out, eye_y + 2, x_out + side * 5, eye_y + 4), fill=(90, 60, 50, 150), width=1)
    if a["Eyeglasses"]:
        _draw_glasses(draw, rng, cx + shift, eye_y, w)
    nose_x = cx + shift * 1.5
    nose_w = 8 if a["Big_Nose"] else 4.5
    draw.polygon([(nose_x, eye_y + 6), (nose_x - nose_w, cy + 14), (nose_x + nose_w, cy + 14)], fill=(0, 0, 0, 40))
    draw.line((nose_x - nose_w, cy + 14, nose_x + nose_w, cy + 14), fill=(60, 30, 20, 120), width=2)


def _draw_glasses(draw, rng, x0, eye_y, w) -> None:
    frame = rng.choice([(20, 20, 20), (120, 80, 30), (180, 180, 190), (150, 20, 30)]) + (255,)
    tint = (30, 30, 40, 170) if rng.random() < 0.25 else None  # sunglasses, eyes still faintly visible
    for side in (-1, 1):
        x = x0 + side * w * 0.42
        draw.rounded_rectangle((x - 12, eye_y - 8, x + 12, eye_y + 8), radius=4, fill=tint, outline=frame, width=2)
        draw.line((x + side * 12, eye_y - 3, x + side * (w * 0.58 + 4), eye_y - 5), fill=frame, width=2)
    draw.line((x0 - w * 0.42 + 12, eye_y - 3, x0 + w * 0.42 - 12, eye_y - 3), fill=frame, width=2)


def _draw_mouth(draw, rng, face, skin, hair, a) -> None:
    cx, cy, w, h, yaw = face
    mx, my = cx + yaw * 5, cy + h * 0.5
    if a["_beard"]:
        draw.chord((cx - w, cy - h * 0.6, cx + w, cy + h + 4), 15, 165, fill=hair + (255,))
    if a["Goatee"]:
        draw.ellipse((mx - 9, my + 8, mx + 9, cy + h + 3), fill=hair + (255,))
    if a["5_o_Clock_Shadow"]:
        draw.chord((cx - w, cy - h * 0.4, cx + w, cy + h), 20, 160, fill=(40, 35, 30, 70))
    lips = (200, 20, 45, 255) if a["Wearing_Lipstick"] else _shade(skin, 0.7)
    if a["Smiling"] and a["Mouth_Slightly_Open"]:
        draw.chord((mx - 14, my - 9, mx + 14, my + 11), 0, 180, fill=(90, 20, 25, 255), outline=lips, width=2)
        draw.rectangle((mx - 9, my + 1, mx + 9, my + 4), fill=(250, 250, 245, 255))  # teeth
    elif a["Smiling"]:
        draw.arc((mx - 14, my - 10, mx + 14, my + 7), 15, 165, fill=lips, width=3)
    elif a["Mouth_Slightly_Open"]:
        draw.ellipse((mx - 8, my - 4, mx + 8, my + 5), fill=(90, 20, 25, 255), outline=lips, width=2)
    else:
        draw.line((mx - 11, my, mx + 11, my), fill=lips, width=3)
    if a["Mustache"]:
        draw.polygon([(mx - 15, my - 3), (mx, my - 9), (mx + 15, my - 3), (mx, my - 5)], fill=hair + (255,))


def _draw_hat(draw, rng, face, hair) -> None:
    cx, cy, w, h, _ = face
    colour = _random_colour(rng) + (255,)
    brim_y = cy - h * 0.55
    for side in (-1, 1):  # hair showing under the brim keeps the hair colour visible
        x = cx + side * (w - 4)
        draw.rectangle((x - 5, brim_y, x + 5, cy - 6), fill=hair + (255,))
    draw.rounded_rectangle((cx - w - 2, cy - h - 30, cx + w + 2, brim_y), radius=12, fill=colour)
    draw.ellipse((cx - w - 20, brim_y - 6, cx + w + 20, brim_y + 6), fill=_shade(colour, 0.75))
    draw.rectangle((cx - w - 2, brim_y - 14, cx + w + 2, brim_y - 8), fill=_shade(colour, 0.5))  # band


def _light(rng: random.Random, image: Image.Image) -> Image.Image:
    """Directional light, exposure and colour cast."""
    side = rng.uniform(-0.35, 0.35) * np.linspace(-1, 1, WIDTH, dtype=np.float32)[:, None]
    cast = np.array([rng.uniform(0.9, 1.1) for _ in range(3)], np.float32)
    gain = ((rng.uniform(0.8, 1.15) + side) * cast * 256).astype(np.uint32)  # (W, 3), fixed point
    pixels = (np.asarray(image).astype(np.uint32) * gain) >> 8
    return Image.fromarray(np.minimum(pixels, 255).astype(np.uint8), "RGB")


def _attribute_row(a: dict[str, bool]) -> list[int]:
    return [(1 if a[name] else -1) if name in SYNTHETIC_ATTRIBUTES else -1 for name in ATTRIBUTE_NAMES]


def _synthetic_chunk(task: tuple[Path, int, list[int]]) -> list[list[int]]:
    dest, seed, indices = task
    rows = []
    for i in indices:
        image, a = draw_face(random.Random(f"synthetic:{seed}:{i}"))
        image.save(dest / f"{i:06d}.jpg", quality=92)
        rows.append(_attribute_row(a))
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


def is_metadata(rel: Path) -> bool:
    """Hidden files and folders, macOS's AppleDouble `._name` twins and `__MACOSX/`: not images."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def folder_images(root: Path) -> list[Path]:
    """The image files under root, sorted, metadata left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES and not is_metadata(p.relative_to(root))
    )


def folder_split(root: Path, files: list[Path]) -> str:
    """ "folders" when every image lies under a top-level train/, val/ (valid/, validation/) or test/
    folder, with train and test present; otherwise "hash"."""
    tops = {p.relative_to(root).parts[0].lower() if len(p.relative_to(root).parts) > 1 else "" for p in files}
    if tops <= set(SPLIT_FOLDERS) and {"train", "test"} <= tops:
        return "folders"
    return "hash"


def copy_folder(cfg: Config, raw: Path, workers: int) -> dict:
    d = cfg.data
    root = Path(d.folder_dir)
    if not d.folder_dir or not root.is_dir():
        raise DataError(f"data.folder_dir={d.folder_dir!r} is not a folder: set it to the folder of your images.")
    files = folder_images(root)
    if not files:
        raise DataError(f"no {'/'.join(sorted(FOLDER_SUFFIXES))} files under {root}: put your images there.")
    split_by = folder_split(root, files)
    width = max(6, len(str(len(files))))
    partition, sources = {}, []
    for i, path in enumerate(tqdm(files, desc="fetch: copy", unit="img", mininterval=1), start=1):
        rel = path.relative_to(root).as_posix()
        suffix = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
        name = f"{i:0{width}d}{suffix}"
        shutil.copyfile(path, raw / IMAGE_DIR / name)
        if split_by == "folders":
            partition[name] = SPLIT_FOLDERS[rel.split("/")[0].lower()]
        else:
            partition[name] = _hash_split(d.seed, rel, d.split_fractions)
        sources.append(f"{name} {rel}\n")
    counts = [sum(p == k for p in partition.values()) for k in range(3)]
    how = (
        "the folder's own train/val/test folders"
        if split_by == "folders"
        else f"data.split_fractions={list(d.split_fractions)}"
    )
    check_split_counts(dict(zip(SPLITS, counts)), f"{len(files)} images in {root}, split by {how}")
    write_partition(raw, partition)
    (raw / "list_source_files.txt").write_text("".join(sources))
    return {
        "source": "folder",
        "folder_dir": d.folder_dir,
        "count": len(files),
        "counts": dict(zip(SPLITS, counts)),
        "split": split_by,
    }


def _hash_split(seed: int, rel: str, fractions: tuple[float, float, float]) -> int:
    """0/1/2 from a seeded hash: a file keeps its split when others are added or removed."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big") / 2**64
    return 0 if u < fractions[0] else 1 if u < fractions[0] + fractions[1] else 2


# ---------------------------------------------------------------------------------------------
# The stage

SOURCES = {"celeba": fetch_celeba, "synthetic": make_synthetic, "folder": copy_folder}


def fetch(cfg: Config, workers: int | None = None) -> dict:
    """Rewrite data.raw_dir from data.source; returns what dataset.json says about it.

    workers: processes for drawing synthetic faces (default: all available cores); copying
    CelebA or a folder is one process, bound by the disk.
    """
    d = cfg.data
    if d.source not in SOURCES:
        raise DataError(f"data.source: {d.source!r} is not one of {sorted(SOURCES)}; pick one.")
    if not math.isclose(sum(d.split_fractions), 1.0) or min(d.split_fractions) < 0:
        raise DataError(f"data.split_fractions={list(d.split_fractions)} must be three fractions >= 0 that sum to 1.")
    raw = Path(d.raw_dir)
    inputs = {"celeba": d.celeba_dir, "folder": d.folder_dir}.get(d.source)
    _reset(raw, Path(inputs) if inputs else None)
    info = SOURCES[d.source](cfg, raw, workers or len(os.sched_getaffinity(0)))
    digest = source_digest(cfg)  # after a download, too
    (raw / "dataset.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    if digest is not None:
        (raw / INVENTORY_FILE).write_text(json.dumps({"source": d.source, "sha256": digest}) + "\n")
    return info


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
    files = folder_images(root) if d.source == "folder" else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
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


def _reset(raw: Path, inputs: Path | None) -> None:
    """Empty raw_dir, refusing a folder that holds the inputs or the project."""
    target = raw.resolve()
    keep = [Path.cwd().resolve()] + ([inputs.resolve()] if inputs else [])
    if any(target == k or target in k.parents for k in keep):
        raise DataError(
            f"data.raw_dir={raw} holds the project or the input data and would be erased: "
            "give it a folder of its own, such as data/raw."
        )
    if raw.exists():
        shutil.rmtree(raw)
    (raw / IMAGE_DIR).mkdir(parents=True)


@command("fetch")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    info = fetch(cfg)
    print(f"fetch: {info['source']} {info.get('counts')} -> {cfg.data.raw_dir}")


if __name__ == "__main__":
    main()
