"""Reading the user's images: which files are images, and each as RGB pixels, or why not.

`folder_images(root)` lists the image files of a tree (FOLDER_SUFFIXES, metadata left out).
`load_rgb(path, crop, max_pixels)` opens one as RGB or raises `Rejected` with the reason for
the shard report (missing, not an image, corrupt, too large, too small, transparent, 16-bit);
`preprocess` centre-crops and resizes it to the training size. Used by the fetch and shard
stages and by `pipeline.sample` on a folder of the user's images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dfcvae.data import DataError

FOLDER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CONVERTIBLE_MODES = {"L", "P", "1", "CMYK", "YCbCr", "LA", "RGBA", "PA", "RGBX"}


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


def load_rgb(path: Path, crop: int | str, max_pixels: int, image_size: int = 1) -> tuple[Image.Image, str]:
    """An RGB image from a raw file and a note on any conversion ("" if none); raises Rejected.

    crop: pixels or "square" (resolve_crop); a square crop must hold image_size pixels, so no
    image is upscaled."""
    if not path.is_file():
        raise Rejected("file missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
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
    note = ""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # EXIF that is not valid TIFF (SyntaxError), bad tags: the pixels are still fine
        note = f"EXIF unreadable ({type(e).__name__}: {e}), orientation left as stored"
    if crop == "square" and min(img.size) < image_size:
        raise Rejected(f"too small: {img.width}x{img.height} is under data.image_size={image_size}")
    if min(img.size) < crop_side(img, crop):
        raise Rejected(f"too small: {img.width}x{img.height} is under data.crop_size={crop}")
    rgb, conversion = _to_rgb(img)
    return rgb, "; ".join(n for n in (note, conversion) if n)


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode not in CONVERTIBLE_MODES:
        raise Rejected(f"unsupported pixel mode {mode} (16-bit or float)")
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


def folder_images(root: Path) -> list[Path]:
    """The image files under root, sorted, metadata left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES and not is_metadata(p.relative_to(root))
    )
