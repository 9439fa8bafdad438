"""The loss terms' sizes per backbone and layer preset, at initialisation and after a short run.

    python -m bench.loss_terms --params P [--set k=v ...] [--steps 200] [--out docs/loss-terms.json]
    python -m bench.loss_terms --params P --recipe [--set k=v ...] --steps 400   # one recipe, its quality

Table mode: for each backbone (mobilenet_v2 with its ImageNet weights, the VGGs with
random weights: their ImageNet files cannot be had offline) and preset (vae123, vae345),
the KL (summed over latents), the pixel MSE, and each layer's feature term under every
`loss.feature_norm` (none, energy, unit), on the first val batches. "init" is a freshly
initialised VAE; "trained" is the same VAE after --steps steps of the recipe in the params
(in process, no Ray: the dfcvae.step step itself, mobilenet_v2 features), so the terms are
those of a model that reconstructs something. The ratio of a feature term to the KL is what
alpha / beta has to balance; a ratio that moves by orders of magnitude between backbones
is why an alpha copied from one network collapses (or never regularises) another.

Recipe mode (--recipe): trains the params' recipe for --steps steps in process and prints
val PSNR, active latent units, the reconstructions' Nyquist power ratio and the tuning
objective's FIDs (eval.val_subset val images), the quick check
behind a recipe before the full `python -m pipeline.compare`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dfcvae.config import Config
from dfcvae.device import Runtime
from dfcvae.evaluate import Evaluator
from dfcvae.features import PerceptualNetwork, resolve_layers
from dfcvae.loss import FEATURE_NORMS, feature_distances, kl_divergence
from dfcvae.metrics import active_units, nyquist_power, psnr
from dfcvae.model import DFCVAE
from dfcvae.step import build_model, seed_step, train_in_process
from dfcvae.worker import fixed_val_batches
from pipeline.common import parse_config

BACKBONES = (("mobilenet_v2", "imagenet"), ("vgg19_bn", "random"), ("vgg19", "random"))
PRESETS = ("vae123", "vae345")


@torch.no_grad()
def terms(model: DFCVAE, batches: list[torch.Tensor], net: PerceptualNetwork) -> dict[str, float]:
    """Mean over batches: kl, pixel_mse and <norm>/<layer> for every feature norm; latent means."""
    out: dict[str, float] = {}
    for x in batches:
        mu, logvar = model.encode(x)
        recon = model.decode(mu)
        values = {"kl": kl_divergence(mu, logvar), "pixel_mse": (recon - x).pow(2).mean()}
        target, features = net(x), net(recon)
        for norm in FEATURE_NORMS:
            for layer, value in feature_distances(target, features, norm).items():
                values[f"{norm}/{layer}"] = value
        for key, value in values.items():
            out[key] = out.get(key, 0.0) + float(value) / len(batches)
    return out


@torch.no_grad()
def quality(model: DFCVAE, batches: list[torch.Tensor]) -> dict[str, float]:
    x = torch.cat(batches)
    mu, _ = model.encode(x)
    recon = model.decode(mu)
    return {
        "val/psnr": psnr(x, recon),
        "val/active_fraction": active_units(mu) / model.latent_dim,
        "val/nyquist_ratio": float(nyquist_power(recon).mean() / nyquist_power(x).mean()),
    }


def table(cfg: Config, steps: int) -> list[dict]:
    runtime = Runtime(torch.device("cpu"))
    batches = fixed_val_batches(cfg, runtime)
    seed_step(cfg.train.seed, 0, -1)
    models = {"init": build_model(cfg, runtime).eval()}
    print(f"short run: {steps} steps of the params' recipe", flush=True)
    models["trained"] = train_in_process(cfg, steps, runtime, progress=True)
    rows = []
    for backbone, weights in BACKBONES:
        for preset in PRESETS:
            net = PerceptualNetwork(backbone, [preset], weights)
            for when, model in models.items():
                values = terms(model, batches, net)
                layers = resolve_layers(backbone, [preset])
                rows.append(
                    {
                        "backbone": backbone,
                        "weights": weights,
                        "preset": preset,
                        "when": when,
                        "kl": values["kl"],
                        "pixel_mse": values["pixel_mse"],
                        **{norm: sum(values[f"{norm}/{layer}"] for layer in layers) for norm in FEATURE_NORMS},
                        "layers": {
                            layer: {norm: values[f"{norm}/{layer}"] for norm in FEATURE_NORMS} for layer in layers
                        },
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backbone (weights) | preset | VAE | KL | pixel MSE | feature: none | energy | unit | none / KL |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} ({r['weights']}) | {r['preset']} | {r['when']} | {r['kl']:.3g} | "
            f"{r['pixel_mse']:.3g} | {r['none']:.3g} | {r['energy']:.3g} | {r['unit']:.3g} | "
            f"{r['none'] / max(r['kl'], 1e-12):.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, default=200)
        parser.add_argument("--recipe", action="store_true", help="train the params' recipe, print its quality")
        parser.add_argument("--out", type=Path, help="JSON output (table mode)")

    cfg, args = parse_config(__doc__.splitlines()[0], argv, options)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.recipe:
        runtime = Runtime(torch.device("cpu"))
        model = train_in_process(cfg, args.steps, runtime, progress=True)
        results = quality(model, fixed_val_batches(cfg, runtime)) | Evaluator()(model, cfg, runtime.device)
        print(json.dumps(results, indent=2))
        return
    rows = table(cfg, args.steps)
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
