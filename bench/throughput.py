"""Training throughput: the project's step against PyTorch-VAE's DFCVAE recipe, in one run.

    python -m bench.throughput                  # GPU: the full table
    python -m bench.throughput --smoke          # CPU: tiny sizes, checks the script runs

Measures, in one process: the project's training step (dfcvae.train.make_train_step,
not a copy) at several batch sizes for two layer sets; a faithful reimplementation
of the reference recipe (fp32, the whole vgg19_bn.features run twice per step with
graph, its BatchNorm in training mode, layers 14/24/34/43); end-to-end training
from webdataset shards (loader included); the data path alone (shards -> batches
on the device); FLOPs per image (torch.utils.flop_counter) and the fraction of the
card's sustained bf16 rate. Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import vgg19_bn

from dfcvae import data
from dfcvae.config import Config
from dfcvae.model import DFCVAE
from dfcvae.train import Runtime, build_model, build_optimizer, build_perceptual, make_train_step, seed_step

# PyTorch-VAE's DFCVAE feature_layers (indices into vgg19_bn.features) and the named
# layers at the same depths: conv3_1 -> relu3_1, bn3_4 -> relu3_4, bn4_3 -> relu4_3, conv5_2 -> relu5_2.
REFERENCE_INDICES = ("14", "24", "34", "43")
LAYER_SETS = {
    "ref-equivalent": ("relu3_1", "relu3_4", "relu4_3", "relu5_2"),
    "vae123": ("relu1_1", "relu2_1", "relu3_1"),
}


def bench_config(args: argparse.Namespace, layers: tuple[str, ...], batch: int, shards_dir: str = "") -> Config:
    overrides = {
        "perceptual.backbone": "vgg19_bn",
        "perceptual.layers": list(layers),
        "perceptual.weights": "random",  # throughput does not depend on the weights' values
        "loader.batch_size": batch,
        "loader.num_workers": args.loader_workers,
        "train.compile": args.compile,
        "optim.schedule": "constant",
        "data.image_size": args.image_size,
    }
    if args.smoke:
        overrides.update({"model.hidden_channels": [8, 16], "model.latent_dim": 8})
    if shards_dir:
        overrides["data.shards_dir"] = shards_dir
    return Config().with_overrides(overrides)


def time_steps(step: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per step after warm-up (compilation and autotuning happen in warm-up)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project_step(cfg: Config, runtime: Runtime):
    torch.manual_seed(0)
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    step = make_train_step(model, build_perceptual(cfg, runtime), optimizer, scheduler, cfg, runtime)
    return model, step


def measure_project(args, runtime: Runtime, layers, batch: int) -> dict:
    cfg = bench_config(args, layers, batch)
    _, step = project_step(cfg, runtime)
    x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, device=runtime.device) * 2 - 1
    x = x.contiguous(memory_format=runtime.memory_format)
    seconds = time_steps(lambda: step(x), args.warmup, args.iters, runtime.device)
    flops = count_flops(bench_config(args, layers, batch).with_overrides({"train.compile": False}), runtime, batch)
    return {"images_per_s": batch / seconds, "flops_per_image": flops / batch}


def count_flops(cfg: Config, runtime: Runtime, batch: int) -> float:
    _, step = project_step(cfg, runtime)
    x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, device=runtime.device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        step(x.contiguous(memory_format=runtime.memory_format))
    return float(counter.get_total_flops())


class ReferenceDFCVAE(nn.Module):
    """PyTorch-VAE's DFCVAE as it trains: fp32, whole VGG twice, VGG BatchNorm in train mode."""

    def __init__(self, hidden: tuple[int, ...], latent: int, image_size: int):
        super().__init__()
        from dfcvae.config import ModelConfig

        self.vae = DFCVAE(ModelConfig(hidden_channels=hidden, latent_dim=latent), image_size)
        self.feature_network = vgg19_bn()  # pretrained=True in the original; values do not matter here
        for p in self.feature_network.parameters():
            p.requires_grad = False

    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features, result = [], x
        for key, module in self.feature_network.features._modules.items():
            result = module(result)
            if key in REFERENCE_INDICES:
                features.append(result)
        return features

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = self.vae(x)
        recon_features, input_features = self.extract_features(recon), self.extract_features(x)
        feature_loss = sum(F.mse_loss(r, i) for r, i in zip(recon_features, input_features))
        kld = torch.mean(-0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1), dim=0)
        return 0.5 * (F.mse_loss(recon, x) + feature_loss) + 1.0 * 0.00025 * kld


def measure_reference(args, device: torch.device, batch: int) -> dict:
    cfg = bench_config(args, LAYER_SETS["ref-equivalent"], batch)
    model = ReferenceDFCVAE(cfg.model.hidden_channels, cfg.model.latent_dim, cfg.data.image_size).to(device)
    model.train()  # Lightning's .train() reaches the VGG too: its BatchNorm runs in training mode
    optimizer = torch.optim.Adam(model.vae.parameters(), lr=5e-3)
    x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, device=device) * 2 - 1

    def step():
        optimizer.zero_grad()
        model.loss(x).backward()
        optimizer.step()

    return {"images_per_s": batch / time_steps(step, args.warmup, args.iters, device)}


def make_shards(args, root: Path) -> str:
    from pipeline.fetch import fetch
    from pipeline.shard import write_shards

    cfg = Config().with_overrides({
        "data.source": "synthetic",
        "data.synthetic_count": args.shard_images,
        "data.raw_dir": str(root / "raw"),
        "data.shards_dir": str(root / "shards"),
        "data.image_size": args.image_size,
        "data.samples_per_shard": max(args.shard_images // 32, 16),
    })
    fetch(cfg)
    write_shards(cfg)
    return cfg.data.shards_dir


def measure_data_path(args, runtime: Runtime, shards_dir: str, batch: int) -> dict:
    cfg = bench_config(args, LAYER_SETS["vae123"], batch, shards_dir)
    images, start = 0, None
    for epoch in range(args.epochs):
        for i, b in enumerate(data.make_loader(cfg, "train", epoch=epoch, train=True)):
            x = data.prepare_batch(b["image"], runtime.device, train=True)
            if start is None:  # the first batch pays for worker start-up
                synchronize(runtime.device)
                start = time.perf_counter()
                continue
            images += x.shape[0]
    synchronize(runtime.device)
    return {"images_per_s": images / (time.perf_counter() - start)}


def measure_end_to_end(args, runtime: Runtime, shards_dir: str, layers, batch: int) -> dict:
    cfg = bench_config(args, layers, batch, shards_dir)
    _, step = project_step(cfg, runtime)
    x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, device=runtime.device) * 2 - 1
    for _ in range(args.warmup):
        step(x.contiguous(memory_format=runtime.memory_format))
    images, start, n = 0, None, 0
    for epoch in range(args.epochs):
        for b in data.make_loader(cfg, "train", epoch=epoch, train=True):
            generator = seed_step(0, 0, n)
            step(data.prepare_batch(b["image"], runtime.device, train=True, generator=generator))
            n += 1
            if start is None:
                synchronize(runtime.device)
                start = time.perf_counter()
                continue
            images += batch
    synchronize(runtime.device)
    return {"images_per_s": images / (time.perf_counter() - start)}


def guarded(measure: Callable[[], dict]) -> dict:
    """One failed measurement (say, a compiler error) is reported in its row, not fatal to the table."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - recorded and printed, the run goes on
        return {"images_per_s": float("nan"), "error": f"{type(err).__name__}: {err}"[:300]}


def run(args: argparse.Namespace) -> dict:
    runtime = Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if runtime.on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 baseline is fp32
    device_name = torch.cuda.get_device_name() if runtime.on_gpu else "cpu"
    rows = []
    for batch in args.reference_batches:
        result = guarded(lambda: measure_reference(args, runtime.device, batch))
        rows.append({"setup": "reference (PyTorch-VAE recipe, fp32)", "layers": "vgg19_bn 14/24/34/43", "batch": batch, **result})
        print(rows[-1], flush=True)
    for name, layers in LAYER_SETS.items():
        for batch in args.batches:
            result = guarded(lambda: measure_project(args, runtime, layers, batch))
            if "flops_per_image" in result:
                result["peak_fraction"] = result["images_per_s"] * result["flops_per_image"] / (args.peak_tflops * 1e12)
            rows.append({"setup": "dfcvae train step", "layers": name, "batch": batch, **result})
            print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = make_shards(args, Path(tmp))
        batch = args.batches[-1]
        rows.append({"setup": "data path (shards -> device)", "layers": "-", "batch": batch,
                     **guarded(lambda: measure_data_path(args, runtime, shards_dir, batch))})
        print(rows[-1], flush=True)
        for name, layers in LAYER_SETS.items():
            rows.append({"setup": "end to end from shards", "layers": name, "batch": batch,
                         **guarded(lambda: measure_end_to_end(args, runtime, shards_dir, layers, batch))})
            print(rows[-1], flush=True)
    return {"device": device_name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "compile": args.compile, "image_size": args.image_size, "rows": rows}


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}, {report['date']}, torch {report['torch']}, "
             f"{report['image_size']} px, compile={report['compile']}",
             "| setup | layers | batch | img/s | GFLOP/img | of bf16 peak |", "|---|---|---|---:|---:|---:|"]
    for r in report["rows"]:
        gflop = f"{r['flops_per_image'] / 1e9:.2f}" if "flops_per_image" in r else ""
        frac = f"{r['peak_fraction']:.0%}" if "peak_fraction" in r else ""
        ips = f"{r['images_per_s']:,.0f}" if "error" not in r else f"failed: {r['error'][:60]}"
        lines.append(f"| {r['setup']} | {r['layers']} | {r['batch']} | {ips} | {gflop} | {frac} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run that checks the script works")
    parser.add_argument("--out", default="outputs/bench/throughput.json")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="sustained bf16 rate of the card")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.reference_batches, args.image_size = [4, 8], [4], 32
        args.warmup, args.iters, args.shard_images, args.loader_workers, args.epochs = 1, 2, 96, 2, 1
        args.compile = False
    else:
        args.batches, args.reference_batches, args.image_size = [64, 256, 1024], [256, 1024], 64
        args.warmup, args.iters, args.shard_images, args.loader_workers, args.epochs = 3, 20, 30000, 8, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
