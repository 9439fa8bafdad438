"""The lattice, enlarged: test images and trained models' reconstructions, with their phase maps.

    python -m bench.lattice --params params-demo.yaml --run "DFC-VAE=outputs/compare/dfc_vae/seed0" \
        [--run LABEL=DIR ...] [--period 8] [--out docs/compare/lattice.png]

Each DIR holds a train stage's output (`DIR/train/model.pt`, as `pipeline.compare` lays out its
runs) or a model.pt itself. The figure has one row per entry: COLS test images (the first row),
then each model's decode(mu) of them, each enlarged SCALE times with nearest neighbours so that
single pixels stay visible, and at the right the row's `metrics.phase_energy` map at --period over
all the test images (grey: the mean phase; white: twice it or more; black: zero). Each row's
lattice peak over the test images' (`metrics.lattice_ratio`) is printed and drawn on the map.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from dfcvae import evaluate, pictures
from dfcvae.checkpoint import load_checkpoint, model_from_state
from dfcvae.config import Config
from dfcvae.metrics import lattice_ratio, phase_energy
from dfcvae.shards.loader import prepare_batch
from pipeline.compare import label_font

COLS = 4  # enlarged test images per row
SCALE = 3  # px per image pixel
LABEL_WIDTH = 170  # px, the label column


def model_file(run: Path) -> Path:
    return run if run.suffix == ".pt" else run / "train" / "model.pt"


def phase_tile(phase_map: torch.Tensor, size: int) -> Image.Image:
    """A (p, p) phase map as a size x size grey tile: 0 black, the mean grey, twice the mean white."""
    grey = (phase_map / phase_map.mean() * 127.5).clamp(0, 255).byte().numpy()
    return Image.fromarray(grey, mode="L").resize((size, size), Image.NEAREST).convert("RGB")


def lattice_figure(cfg: Config, runs: dict[str, Path], period: int) -> tuple[Image.Image, dict[str, float]]:
    """The figure (module docstring) and each row's peak over the test images'."""
    images, _ = evaluate.read_split(cfg, "test", cfg.eval.num_samples)
    x = prepare_batch(images, "cpu", train=False).contiguous()  # (N, 3, S, S) in [-1, 1]
    rows = {"test images": x}
    with torch.no_grad():
        for label, run in runs.items():
            model = model_from_state(load_checkpoint(model_file(run)), "cpu")[0].eval()
            rows[label] = torch.cat([model.decode(model.encode(batch)[0]) for batch in x.split(64)])
    maps = {label: phase_energy(batch, period) for label, batch in rows.items()}
    peaks = {label: lattice_ratio(m, maps["test images"]) for label, m in maps.items()}
    strips = {}
    for label, batch in rows.items():
        strip = pictures.grid_image(batch[:COLS], nrow=COLS)
        strips[label] = strip.resize((strip.width * SCALE, strip.height * SCALE), Image.NEAREST)
    width, height = strips["test images"].size
    tile_size = height // 2
    figure = Image.new("RGB", (LABEL_WIDTH + width + 8 + tile_size + 8, height * len(rows)), "white")
    draw, font = ImageDraw.Draw(figure), label_font()
    for i, (label, strip) in enumerate(strips.items()):
        top = i * height
        figure.paste(strip, (LABEL_WIDTH, top))
        left = LABEL_WIDTH + width + 8
        figure.paste(phase_tile(maps[label], tile_size), (left, top + tile_size // 4))
        draw.text((left, top + tile_size * 5 // 4 + 6), f"peak {peaks[label]:.2f}", fill="black", font=font)
        draw.text((6, top + height // 2), label, fill="black", font=font, anchor="lm")
    return figure, peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("lattice.png"))
    args = parser.parse_args(argv)
    runs = {}
    for entry in args.run:
        label, sep, path = entry.partition("=")
        if not sep:
            parser.error(f"--run {entry!r}: expected LABEL=DIR.")
        runs[label] = Path(path)
    figure, peaks = lattice_figure(Config.load(args.params), runs, args.period)
    figure.save(args.out)
    for label, peak in peaks.items():
        print(f"{label}: lattice peak at period {args.period}, over the test images' {peak:.2f}")
    print(f"wrote {args.out} ({figure.width} x {figure.height} px)")


if __name__ == "__main__":
    main()
