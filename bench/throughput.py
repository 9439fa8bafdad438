"""Training throughput: the project's step against PyTorch-VAE's DFCVAE recipe, in one run.

    python -m bench.throughput                  # GPU: the full table
    python -m bench.throughput --smoke          # CPU: tiny sizes, checks the script runs

Measures, in one process: the project's training step (dfcvae.step.make_train_step,
not a copy) at several batch sizes for two layer sets; a faithful reimplementation
of the reference recipe (fp32, the whole vgg19_bn.features run twice per step with
graph, its BatchNorm in training mode, layers 14/24/34/43); end-to-end training
from webdataset shards (loader included); the data path alone (shards -> batches
on the device); FLOPs per image (torch.utils.flop_counter) and the fraction of the
card's sustained bf16 rate. Prints one table and writes JSON (after every row, so a run
cut short keeps what it measured).

Levers are rows of their own: the step under each torch.compile mode (`--compile-modes`;
reduce-overhead replays CUDA graphs) and the data path at several loader worker counts.
The data rows read a CelebA-sized epoch (`--shard-images`): a set of unique synthetic faces
whose train shards are repeated under new names, so epoch boundaries (new worker processes)
weigh as much as they do in real training. `--profile` writes the top GPU kernels of one step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import vgg19_bn

from dfcvae.config import Config
from dfcvae.device import Runtime, default_device
from dfcvae.model import DFCVAE
from dfcvae.shards.format import write_manifest
from dfcvae.shards.loader import prepare_batch, train_stream
from dfcvae.shards.plan import batches_per_epoch
from dfcvae.step import build_model, build_optimizer, build_perceptual, make_train_step, seed_step

# PyTorch-VAE's DFCVAE feature_layers (indices into vgg19_bn.features) and the named
# layers at the same depths: conv3_1 -> relu3_1, bn3_4 -> relu3_4, bn4_3 -> relu4_3, conv5_2 -> relu5_2.
REFERENCE_INDICES = ("14", "24", "34", "43")
LAYER_SETS = {
    "ref-equivalent": ("relu3_1", "relu3_4", "relu4_3", "relu5_2"),
    "vae123": ("relu1_1", "relu2_1", "relu3_1"),
}


def bench_config(
    args: argparse.Namespace,
    layers: tuple[str, ...],
    batch: int,
    shards_dir: str = "",
    mode: str = "default",
    loader_workers: int | None = None,
) -> Config:
    overrides = {
        "perceptual.backbone": "vgg19_bn",
        "perceptual.layers": list(layers),
        "perceptual.weights": "random",  # throughput does not depend on the weights' values
        "loader.batch_size": batch,
        "loader.num_workers": loader_workers or args.loader_workers[-1],
        "train.compile": args.compile,
        "train.compile_mode": mode,
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


def random_batch(cfg: Config, runtime: Runtime) -> torch.Tensor:
    size, batch = cfg.data.image_size, cfg.loader.batch_size
    x = torch.rand(batch, 3, size, size, device=runtime.device) * 2 - 1
    return x.contiguous(memory_format=runtime.memory_format)


def measure_project(args, runtime: Runtime, layers, batch: int, mode: str) -> dict:
    cfg = bench_config(args, layers, batch, mode=mode)
    _, step = project_step(cfg, runtime)
    x = random_batch(cfg, runtime)
    seconds = time_steps(lambda: step(x), args.warmup, args.iters, runtime.device)
    flops = count_flops(cfg.with_overrides({"train.compile": False}), runtime, batch)
    return {"images_per_s": batch / seconds, "flops_per_image": flops / batch}


def profile_step(args, runtime: Runtime, layers, batch: int, mode: str, out: Path) -> None:
    """The step's GPU kernels by total time, one table (torch.profiler), for where time goes."""
    from torch.profiler import ProfilerActivity, profile

    cfg = bench_config(args, layers, batch, mode=mode)
    _, step = project_step(cfg, runtime)
    x = random_batch(cfg, runtime)
    time_steps(lambda: step(x), args.warmup, 1, runtime.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_steps(lambda: step(x), 0, 5, runtime.device)
    table = prof.key_averages().table(
        sort_by="self_device_time_total" if runtime.on_gpu else "self_cpu_time_total", row_limit=30
    )
    out.write_text(f"{layers} batch {batch} compile mode {mode}, 5 steps\n{table}\n")


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
    """Shards of `args.unique_images` synthetic faces, the train shards repeated up to
    `args.shard_images` in all (see replicate_train_shards)."""
    from dfcvae.fetch import fetch
    from dfcvae.sharding import write_shards

    cfg = Config().with_overrides(
        {
            "data.source": "synthetic",
            "data.synthetic_count": args.unique_images,
            "data.inventory_dir": str(root / "inventory"),
            "data.shards_dir": str(root / "shards"),
            "data.image_size": args.image_size,
            "data.samples_per_shard": max(args.unique_images // 32, 16),
        }
    )
    fetch(cfg)
    write_shards(cfg)
    replicate_train_shards(Path(cfg.data.shards_dir), args.shard_images * cfg.data.split_fractions[0])
    return cfg.data.shards_dir


def replicate_train_shards(shards_dir: Path, train_images: float) -> None:
    """Repeat the train shards under new names until the split holds about `train_images`,
    and rewrite the manifest (and its hash) to list them: a real-sized epoch for the loader."""
    manifest_path = shards_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    train = manifest["splits"]["train"]
    originals = list(train["shards"])
    copies = max(1, round(train_images / train["count"]))
    for copy in range(1, copies):
        for shard in originals:
            name = f"train-r{copy:03d}-{shard['name'].removeprefix('train-')}"
            os.link(shards_dir / shard["name"], shards_dir / name)
            train["shards"].append({**shard, "name": name})
    train["count"] *= copies
    write_manifest(shards_dir, manifest)


def steps_for(cfg: Config, epochs: int) -> int:
    return epochs * batches_per_epoch(cfg, "train", 1)


def finish(runtime: Runtime, images: int, start: float, cpu: float, epochs: int) -> dict:
    """img/s since `start`, and the main process's CPU time per wall second (all its threads:
    near 1 or above, the process that feeds the device is the bottleneck, not the workers)."""
    synchronize(runtime.device)
    wall = time.perf_counter() - start
    return {"images_per_s": images / wall, "main_cpu_per_wall": (time.process_time() - cpu) / wall, "epochs": epochs}


def measure_data_path(args, runtime: Runtime, shards_dir: str, batch: int, workers: int) -> dict:
    """Shards -> float batches on the device through train_stream, as training reads them."""
    cfg = bench_config(args, LAYER_SETS["vae123"], batch, shards_dir, loader_workers=workers)
    images, start, steps = 0, None, steps_for(cfg, args.epochs)
    for step, b in train_stream(cfg, device=runtime.device):
        if step == steps:
            break
        prepare_batch(b["image"], runtime.device, train=True, generator=seed_step(0, 0, step))
        if start is None:  # the first batch pays for the first workers' start-up, once per run
            synchronize(runtime.device)
            start, cpu = time.perf_counter(), time.process_time()
            continue
        images += batch
    return finish(runtime, images, start, cpu, args.epochs)


def measure_end_to_end(args, runtime: Runtime, shards_dir: str, layers, batch: int, mode: str, workers: int) -> dict:
    """The training loop's own path: train_stream -> prepare_batch -> step, epoch boundaries included."""
    cfg = bench_config(args, layers, batch, shards_dir, mode=mode, loader_workers=workers)
    _, step_fn = project_step(cfg, runtime)
    x = random_batch(cfg, runtime)
    for _ in range(args.warmup):
        step_fn(x)
    images, start, steps = 0, None, steps_for(cfg, args.epochs)
    for step, b in train_stream(cfg, device=runtime.device):
        if step == steps:
            break
        step_fn(prepare_batch(b["image"], runtime.device, train=True, generator=seed_step(0, 0, step)))
        if start is None:
            synchronize(runtime.device)
            start, cpu = time.perf_counter(), time.process_time()
            continue
        images += batch
    return finish(runtime, images, start, cpu, args.epochs)


def guarded(measure: Callable[[], dict]) -> dict:
    """One failed measurement (say, a compiler error) is reported in its row, not fatal to the table."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - recorded and printed, the run goes on
        return {"images_per_s": float("nan"), "error": f"{type(err).__name__}: {err}"[:300]}


class Report:
    """The table being measured: rows in order, written to JSON after each; a time budget
    past which the remaining rows are recorded as skipped rather than measured."""

    def __init__(self, args: argparse.Namespace, device_name: str):
        self.args, self.start = args, time.perf_counter()
        self.data = {
            "device": device_name,
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "compile": args.compile,
            "image_size": args.image_size,
            "rows": [],
        }

    def add(self, setup: str, layers: str, batch: int, measure: Callable[[], dict], **extra) -> dict:
        elapsed = time.perf_counter() - self.start
        if self.args.budget_s and elapsed > self.args.budget_s:
            result = {"images_per_s": float("nan"), "error": f"skipped: time budget {self.args.budget_s:.0f} s spent"}
        else:
            result = guarded(measure)
        row = {"setup": setup, "layers": layers, "batch": batch, **extra, **result}
        if "flops_per_image" in row:
            row["peak_fraction"] = row["images_per_s"] * row["flops_per_image"] / (self.args.peak_tflops * 1e12)
        self.data["rows"].append(row)
        print(row, flush=True)
        self.save()
        return row

    def fastest_mode(self, layers: str, batch: int) -> str:
        """The compile mode whose step row for (layers, batch) measured fastest: end to end uses it."""
        rows = [
            r
            for r in self.data["rows"]
            if r["setup"] == "dfcvae train step" and r["layers"] == layers and r["batch"] == batch and "error" not in r
        ]
        return max(rows, key=lambda r: r["images_per_s"])["compile_mode"] if rows else self.args.compile_modes[0]

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.data, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict:
    runtime = Runtime(default_device())
    if runtime.on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 baseline is fp32
    report = Report(args, torch.cuda.get_device_name() if runtime.on_gpu else "cpu")
    reference = "reference (PyTorch-VAE recipe, fp32)"
    for batch in args.reference_batches:
        report.add(
            reference, "vgg19_bn 14/24/34/43", batch, functools.partial(measure_reference, args, runtime.device, batch)
        )
    for mode in args.compile_modes:
        for name, layers in LAYER_SETS.items():
            for batch in args.batches:
                report.add(
                    "dfcvae train step",
                    name,
                    batch,
                    functools.partial(measure_project, args, runtime, layers, batch, mode),
                    compile_mode=mode,
                )
    if args.profile:
        guarded(
            lambda: (
                profile_step(
                    args,
                    runtime,
                    LAYER_SETS["vae123"],
                    args.batches[-1],
                    args.compile_modes[-1],
                    Path(args.out).with_suffix(".profile.txt"),
                )
                or {}
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = make_shards(args, Path(tmp))
        batch = args.batches[-1]
        for workers in args.loader_workers:
            report.add(
                "data path (shards -> device)",
                "-",
                batch,
                functools.partial(measure_data_path, args, runtime, shards_dir, batch, workers),
                loader_workers=workers,
            )
        for name, layers in LAYER_SETS.items():
            mode = report.fastest_mode(name, batch)
            for workers in args.loader_workers:
                report.add(
                    "end to end from shards",
                    name,
                    batch,
                    functools.partial(measure_end_to_end, args, runtime, shards_dir, layers, batch, mode, workers),
                    loader_workers=workers,
                    compile_mode=mode,
                )
    return report.data


def format_table(report: dict) -> str:
    lines = [
        f"device: {report['device']}, {report['date']}, torch {report['torch']}, "
        f"{report['image_size']} px, compile={report['compile']}",
        "| setup | layers | batch | compile mode | loader workers | img/s | GFLOP/img | of bf16 peak |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        gflop = f"{r['flops_per_image'] / 1e9:.2f}" if "flops_per_image" in r else ""
        frac = f"{r['peak_fraction']:.0%}" if "peak_fraction" in r else ""
        ips = f"{r['images_per_s']:,.0f}" if "error" not in r else f"failed: {r['error'][:60]}"
        lines.append(
            f"| {r['setup']} | {r['layers']} | {r['batch']} | {r.get('compile_mode', '')} | "
            f"{r.get('loader_workers', '')} | {ips} | {gflop} | {frac} |"
        )
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run that checks the script works")
    parser.add_argument("--out", default="outputs/bench/throughput.json")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--compile-modes",
        help="torch.compile modes to measure the step under, comma-separated; end to end uses the fastest",
    )
    parser.add_argument("--batches", type=int_list, help="step batch sizes, comma-separated")
    parser.add_argument("--loader-workers", type=int_list, help="data path worker counts; the last is used end to end")
    parser.add_argument("--epochs", type=int, help="epochs read by the data and end-to-end rows")
    parser.add_argument("--shard-images", type=int, help="images in the data rows' shard set (train: 80%%)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip the rows left after this many seconds")
    parser.add_argument("--profile", action="store_true", help="write the top GPU kernels of one vae123 step")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="sustained bf16 rate of the card")
    args = parser.parse_args(argv)
    if args.smoke:  # CPU: no compilation, so one mode; two copies of a small shard set
        defaults = {
            "batches": [4, 8],
            "loader_workers": [2],
            "epochs": 1,
            "shard_images": 96,
            "compile_modes": "default",
        }
        args.reference_batches, args.image_size, args.warmup, args.iters, args.unique_images = [4], 32, 1, 2, 48
        args.compile = False
    else:
        defaults = {
            "batches": [64, 256, 1024],
            "loader_workers": [8, 16],
            "epochs": 2,
            "shard_images": 200_000,
            "compile_modes": "default,reduce-overhead",
        }
        args.reference_batches, args.image_size, args.warmup, args.iters, args.unique_images = (
            [256, 1024],
            64,
            3,
            20,
            20_000,
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile_modes = args.compile_modes.split(",")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
