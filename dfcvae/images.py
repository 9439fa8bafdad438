"""Reading the user's images: which files are images, and each as RGB pixels, or why not.

`list_folder(root)` lists the image files of a tree (FOLDER_SUFFIXES), following symbolic links
without looping, and every other file with the reason it was skipped.
`load_rgb(file, crop, max_pixels)` opens one (a path or its bytes) as RGB or raises `Rejected` with the reason for
the shard report (missing, not an image, corrupt, too large, too small, transparent, 16-bit);
`preprocess` centre-crops and resizes it to the training size. Used by the fetch and shard
stages and by `pipeline.sample` on a folder of the user's images.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dfcvae.shards.format import DataError

# The raster formats Pillow reads that photographs come in (Pillow's own list also holds icons,
# fonts, scientific and vector formats). Other files are skipped, each with its reason.
FOLDER_SUFFIXES = {
    *(".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".avif", ".gif", ".bmp", ".dib"),
    *(".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi"),
}
NOT_READ = {  # suffix -> why, for image files Pillow cannot read here
    **dict.fromkeys((".heic", ".heif"), "HEIC/HEIF, which Pillow cannot read: convert it to JPEG or PNG"),
    **dict.fromkeys(
        (".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".raf", ".rw2"),
        "a camera raw file: develop it to JPEG, PNG or TIFF first",
    ),
    **dict.fromkeys((".svg", ".pdf", ".eps", ".ai"), "a vector or page format, not pixels: export it to PNG"),
}
CONVERTIBLE_MODES = {"L", "P", "1", "CMYK", "YCbCr", "LA", "RGBA", "PA", "RGBX"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I"}  # 16-bit grayscale PNG and TIFF open as one of these


class Rejected(Exception):
    """A raw image that cannot be used; the message is the reason for the report."""


CELEBA_CROP = 148  # PyTorch-VAE's centre crop of CelebA's aligned 178x218 faces
SMALL_CROP = 0.25  # a crop keeping less of an image's area than this is warned about


def resolve_crop(crop_size: int | str, source: str) -> int | str:
    """data.crop_size -> pixels, or "square"; DataError for anything else."""
    if crop_size == "auto":
        return "square" if source == "folder" else CELEBA_CROP
    if crop_size == "square" or (isinstance(crop_size, int) and crop_size >= 1):
        return crop_size
    raise DataError(
        f"data.crop_size={crop_size!r}: use a number of pixels, square (the centre square of the shorter side) or auto."
    )


def crop_side(img: Image.Image, crop: int | str) -> int:
    return min(img.size) if crop == "square" else crop


def load_rgb(file: Path | bytes, crop: int | str, max_pixels: int, image_size: int = 1) -> tuple[Image.Image, str]:
    """An RGB image from an image file (a path, or its bytes) and a note on any conversion ("" if
    none); raises Rejected.

    crop: pixels or "square" (resolve_crop); a square crop must hold image_size pixels, so no
    image is upscaled."""
    if isinstance(file, Path) and not file.is_file():
        raise Rejected("file missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(file) if isinstance(file, bytes) else file)
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected(f"too large: {width}x{height} is over data.max_image_pixels={max_pixels}")
            img.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected(f"truncated or corrupt: {e}") from None
    frames = getattr(img, "n_frames", 1)
    notes = [f"{img.format}: the first of {frames} frames"] if frames > 1 else []
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # EXIF that is not valid TIFF (SyntaxError), bad tags: the pixels are still fine
        notes.append(f"EXIF unreadable ({type(e).__name__}: {e}), orientation left as stored")
    if crop == "square" and min(img.size) < image_size:
        raise Rejected(f"too small: {img.width}x{img.height} is under data.image_size={image_size}")
    if min(img.size) < crop_side(img, crop):
        raise Rejected(f"too small: {img.width}x{img.height} is under data.crop_size={crop}")
    rgb, conversion = _to_rgb(img)
    return rgb, "; ".join(n for n in (*notes, conversion) if n)


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(img)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise Rejected(f"unsupported pixel mode {mode} with values outside 16 bits")
        eight = np.rint(pixels.astype(np.float32) / 257).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(eight, "L").convert("RGB"), f"{mode} (16-bit) -> 8-bit RGB"
    if mode not in CONVERTIBLE_MODES:
        raise Rejected(f"unsupported pixel mode {mode} (float or 32-bit pixels)")
    if mode in ("P", "PA", "LA", "RGBA") and (mode != "P" or "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            raise Rejected(f"{mode} with transparent pixels: flatten it onto a background first")
        return rgba.convert("RGB"), f"{mode} -> RGB (alpha fully opaque, dropped)"
    return img.convert("RGB"), f"{mode} -> RGB"


def preprocess(img: Image.Image, crop: int | str, image_size: int) -> np.ndarray:
    """Centre crop (pixels or "square"), resize to image_size -> (image_size, image_size, 3) uint8."""
    side = crop_side(img, crop)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def is_metadata(rel: Path) -> bool:
    """Hidden files and folders, macOS's AppleDouble `._name` twins and `__MACOSX/`: not images."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


@dataclass(frozen=True)
class FolderListing:
    """What `list_folder` found: images (sorted paths under root, possibly through links), every
    other file or folder with the reason it was skipped, and how many symbolic links were followed."""

    images: list[Path]
    skipped: list[tuple[Path, str]]
    links_followed: int


def list_folder(root: Path) -> FolderListing:
    """The image files under root and every other file with why it was skipped.

    Symbolic links to files and folders are followed; a folder reached a second time (a link
    loop, or two links to one folder) is listed once and the second path skipped with the reason.
    Hidden files and folders and macOS metadata are skipped, not read."""
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    links = 0
    seen = {_inode(root): root}
    for here, dirs, files in os.walk(root, followlinks=True):
        here_path = Path(here)
        kept = []
        for name in sorted(dirs):
            path = here_path / name
            links += path.is_symlink()
            reason = _skip_folder(path, root, seen)
            if reason:
                skipped.append((path, reason))
            else:
                kept.append(name)
        dirs[:] = kept
        for name in files:
            path = here_path / name
            links += path.is_symlink()
            reason = _skip_file(path, root)
            if reason:
                skipped.append((path, reason))
            else:
                images.append(path)
    return FolderListing(sorted(images), sorted(skipped), links)


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _skip_folder(path: Path, root: Path, seen: dict[tuple[int, int], Path]) -> str:
    if is_metadata(path.relative_to(root)):
        return "a hidden or macOS metadata folder: not read"
    try:
        key = _inode(path)
    except OSError as err:
        return f"a link to nothing ({err.strerror})"
    if key in seen:
        return f"the folder {seen[key].relative_to(root).as_posix()} again (through a link): read once"
    seen[key] = path
    return ""


def _skip_file(path: Path, root: Path) -> str:
    if is_metadata(path.relative_to(root)):
        return "a hidden or macOS metadata file"
    if not path.exists():
        return "a link to nothing"
    if not path.is_file():
        return "not a regular file"
    suffix = path.suffix.lower()
    if suffix in FOLDER_SUFFIXES:
        return ""
    return NOT_READ.get(suffix, f"not an image type read here ({suffix or 'no suffix'})")
