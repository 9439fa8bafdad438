"""A folder of natural photographs for `data.source: folder`, from photographs that ship in packages.

    python -m bench.photos --out data/photos [--count 1200] [--size 148] [--seed 0]

Random square crops (side 30-100% of the photo's shorter side, any position, mirrored half
of the time) of the colour scene photographs bundled with scikit-image (`skimage/data`:
a cat, coffee, a rocket launch, two views of a motorcycle, the Hubble deep field) and
scikit-learn (`sklearn/datasets/images`: a Chinese temple, a flower), written as PNG of
--size px. No faces. The quality comparison on real photographs (docs/quality.md) trains
on such a folder. The crops of one photograph overlap and fall into every split, so the
folder measures how well a model reconstructs natural image statistics (texture, edges,
colour), not how it generalises to unseen scenes.

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


def write_crops(out: Path, count: int, size: int, seed: int) -> list[Path]:
    """count PNG crops of size x size px into out (created; existing crops are overwritten)."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        photo = photos[i % len(photos)]
        short = min(photo.size)
        side = rng.randint(int(MIN_SIDE * short), short)
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        path = out / f"photo_{i:05d}.png"
        crop.save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--size", type=int, default=148, help="px; the crops are square")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = write_crops(args.out, args.count, args.size, args.seed)
    except FileNotFoundError as err:
        raise SystemExit(f"photos: {err}") from None
    print(f"photos: {len(written)} crops of {len(PHOTOS)} photographs -> {args.out}")


if __name__ == "__main__":
    main()
