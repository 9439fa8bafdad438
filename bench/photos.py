"""A folder of natural photographs for `data.source: folder`, from photographs that ship in packages.

    python -m bench.photos --out data/photos [--layout hash|photograph] [--count 1200] [--size 148] [--seed 0]

Random square crops (side 30-100% of the photo's shorter side, any position, mirrored half
of the time) of the colour scene photographs bundled with scikit-image (`skimage/data`:
a cat, coffee, a rocket launch, two views of a motorcycle, the Hubble deep field) and
scikit-learn (`sklearn/datasets/images`: a Chinese temple, a flower), written as PNG of
--size px. No faces. The quality comparison on real photographs (docs/quality.md) trains
on such a folder. Each photograph gives count / 8 crops, the same crops in either layout:

    hash        one flat folder: fetch splits it by a hash of each file's content, so the crops
                of one photograph overlap and fall into every split. It measures how well a
                model reconstructs natural image statistics (texture, edges, colour), not how
                it generalises to scenes it has not seen.
    photograph  train/, val/ and test/ folders by photograph (SPLIT_OF below), which fetch keeps:
                the test photographs' crops were never trained on.

Needs scikit-image (in the project's dev extras); fails in one sentence without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

from PIL import Image, ImageOps

# (package, file inside the package) of each colour photograph of a natural scene.
PHOTOS = (
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
MIN_SIDE = 0.3  # of the shorter side
# The photograph layout's split of each photograph (by file name): the test scenes (a cat, a temple)
# and the val scene (a flower) have nothing like them in train.
SPLIT_OF = {"chelsea.png": "test", "china.jpg": "test", "flower.jpg": "val"}
LAYOUTS = ("hash", "photograph")


def photo_paths() -> list[Path]:
    """The bundled photographs; FileNotFoundError naming what to install when one is missing."""
    paths = []
    for package, rel in PHOTOS:
        spec = importlib.util.find_spec(package)
        path = Path(spec.origin).parent / rel if spec and spec.origin else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"{package}/{rel} not found: install the project's dev extras (`make setup`, or "
                "`pip install scikit-image scikit-learn`) to build the photograph folder."
            )
        paths.append(path)
    return paths


def write_crops(out: Path, count: int, size: int, seed: int, layout: str = "hash") -> list[Path]:
    """count PNG crops of size x size px into out (created; existing crops are overwritten), crop i
    from photograph i mod 8; under out itself (layout "hash") or under out/<split>/ by photograph
    (layout "photograph"). ValueError for another layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    rng = random.Random(seed)
    paths = photo_paths()
    photos = [Image.open(p).convert("RGB") for p in paths]
    folders = [out / SPLIT_OF.get(p.name, "train") if layout == "photograph" else out for p in paths]
    for folder in set(folders):
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        photo = photos[i % len(photos)]
        short = min(photo.size)
        side = rng.randint(int(MIN_SIDE * short), short)
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        path = folders[i % len(photos)] / f"photo_{i:05d}.png"
        crop.save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layout", choices=LAYOUTS, default="hash", help="default: hash (see above)")
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--size", type=int, default=148, help="px; the crops are square")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = write_crops(args.out, args.count, args.size, args.seed, args.layout)
    except FileNotFoundError as err:
        raise SystemExit(f"photos: {err}") from None
    print(f"photos: {len(written)} crops of {len(PHOTOS)} photographs -> {args.out} ({args.layout} layout)")


if __name__ == "__main__":
    main()
