"""Pictures from any trained model: prior samples, or reconstructions of your own images.

    python -m pipeline.sample --model outputs/train/model.pt --out samples.png [--n 64 --seed 0]
    python -m pipeline.sample --model models:/dfcvae@champion --out recon.png --reconstruct photos/

--model: the train stage's model.pt, a checkpoint file or directory, or a registered model.
Samples: n decodings of codes drawn from --seed, ceil(n / cols) rows of cols images. --sampler:
"default" the sampler a registered model was evaluated with (dfcvae/sampler.py), else z ~ N(0, I);
"normal" z ~ N(0, T^2 I), T = --temperature; or a sampler.safetensors file (eval.out_dir).
--reconstruct: the first n images (sorted by path, .jpg .jpeg .png .webp, recursive) of the
folder, prepared as the shards are (centre crop of data.crop_size, or of the shorter side
when smaller, then resized to the model's size); each row of cols inputs is followed by a
row of their reconstructions, unused cells white. cols: --nrow, else ceil(sqrt(n)) for
samples and 8 for reconstructions. Runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from pathlib import Path

import torch

from dfcvae import pictures, tracking
from dfcvae.checkpoint import REGISTERED_ARTIFACT, download_registered, load_checkpoint, load_model, model_from_state
from dfcvae.config import Config
from dfcvae.device import default_device
from dfcvae.evaluate import evaluation_mode
from dfcvae.images import FOLDER_SUFFIXES, Rejected, list_folder, load_rgb, preprocess, resolve_crop
from dfcvae.model import DFCVAE
from dfcvae.sampler import NormalSampler, Sampler, load_sampler
from dfcvae.served import SAMPLER_ARTIFACT
from dfcvae.shards.loader import prepare_batch
from pipeline.common import command

log = logging.getLogger(__name__)
RECON_COLS = 8


def sample_pictures(model: DFCVAE, n: int, seed: int, cols: int, sampler: Sampler | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = (sampler or NormalSampler(model.latent_dim)).sample(n, generator)
    images, _ = pictures.sample_grid(model, n, generator, nrow=cols, z=z)
    return images


def load_with_sampler(source: str, device: torch.device) -> tuple[DFCVAE, Config, Sampler | None]:
    """The model, its config, and the sampler a registered model was stored with (one download)."""
    if not source.startswith("models:/"):
        return (*load_model(source, device), None)
    with tempfile.TemporaryDirectory() as tmp:
        files = download_registered(source, tmp)
        model, cfg = model_from_state(load_checkpoint(files[REGISTERED_ARTIFACT]), device)
        stored = files.get(SAMPLER_ARTIFACT)
        return model, cfg, load_sampler(stored) if stored else None


def choose_sampler(name: str, stored: Sampler | None, latent_dim: int, temperature: float) -> Sampler:
    """--sampler: default (the registered model's stored sampler, else normal), normal, or a file."""
    if name == "default" and stored is not None:
        return stored
    if name in ("default", "normal"):
        return NormalSampler(latent_dim, temperature)
    if not Path(name).is_file():
        raise FileNotFoundError(f"--sampler {name}: use default, normal, or a sampler.safetensors file.")
    return load_sampler(Path(name))


def read_folder(folder: Path, limit: int, cfg: Config) -> torch.Tensor:
    """The first `limit` readable images under `folder`, prepared as the shards: uint8 (N, 3, S, S)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--reconstruct {folder} is not a folder of images.")
    paths = list_folder(folder).images  # as fetch lists a folder: hidden and macOS metadata files left out
    images = []
    for path in paths:
        if len(images) == limit:
            break
        try:
            img, _ = load_rgb(path, 1, cfg.data.max_image_pixels)
        except Rejected as err:
            log.warning("skipping %s: %s", path, err)
            continue
        crop = resolve_crop(cfg.data.crop_size, cfg.data.source)  # as the model's training shards were cut
        array = preprocess(img, crop if crop == "square" else min(crop, *img.size), cfg.data.image_size)  # (S, S, 3)
        images.append(torch.tensor(array).permute(2, 0, 1))  # a copy: PIL arrays are read-only
    if not images:
        raise FileNotFoundError(f"no readable images ({'/'.join(sorted(FOLDER_SUFFIXES))}) under {folder}.")
    return torch.stack(images)


def reconstruction_pictures(model: DFCVAE, images: torch.Tensor, cols: int) -> torch.Tensor:
    """Rows of `cols` inputs, each followed by their reconstructions; padded with white: (R * cols, 3, S, S)."""
    device = next(model.parameters()).device
    x = prepare_batch(images, "cpu", train=False).contiguous()
    with evaluation_mode(model):
        recon = model.decode(model.encode(x.to(device))[0]).float().cpu()
    pad = -len(x) % cols
    white = torch.ones(pad, *x.shape[1:])
    x, recon = torch.cat([x, white]), torch.cat([recon, white])
    rows = [part for i in range(0, len(x), cols) for part in (x[i : i + cols], recon[i : i + cols])]
    return torch.cat(rows)


@command("sample")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.pt, checkpoint dir, or models:/<name>@<alias>")
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--n", type=int, default=64, help="samples, or images to reconstruct (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="prior samples' seed (default 0)")
    parser.add_argument("--nrow", type=int, default=0, help="images per row (default: see above)")
    parser.add_argument("--reconstruct", type=Path, help="a folder of images to reconstruct instead of sampling")
    parser.add_argument("--sampler", default="default", help="default | normal | a sampler.safetensors file")
    parser.add_argument("--temperature", type=float, default=1.0, help="the normal sampler's std (default 1)")
    parser.add_argument("--params", default="params.yaml", help="where the MLflow store is (default: params.yaml)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = default_device()
    if str(args.model).startswith("models:/"):  # the project's store, found as the stages find it
        tracking.use_store(Config.load(args.params).mlflow)
    model, cfg, stored = load_with_sampler(str(args.model), device)
    if args.reconstruct:
        cols = args.nrow or RECON_COLS
        grid = reconstruction_pictures(model, read_folder(args.reconstruct, args.n, cfg), cols)
    else:
        cols = args.nrow or math.ceil(math.sqrt(args.n))
        sampler = choose_sampler(args.sampler, stored, model.latent_dim, args.temperature)
        grid = sample_pictures(model, args.n, args.seed, cols, sampler)
    path = pictures.save_grid(grid, args.out, nrow=cols)
    rows, cols = math.ceil(len(grid) / cols), min(cols, len(grid))
    print(f"wrote {path}: {rows} rows x {cols} images of {cfg.data.image_size} px")


if __name__ == "__main__":
    main(sys.argv[1:])
