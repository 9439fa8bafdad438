"""One training step without Ray: the model, optimiser and schedule, the step, validation.

What the Ray Train worker loop (`dfcvae.worker`) runs on every rank, and what `bench/` and the
tests run in one process (`train_in_process`). Randomness is derived from (seed, rank, step),
so a run resumed from a checkpoint draws exactly the numbers the uninterrupted run would have
drawn, on every rank. Only the VAE is trained; the perceptual network is frozen.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from dfcvae.config import Config, ConfigError, UserError
from dfcvae.device import Runtime
from dfcvae.features import PerceptualNetwork, lattice_periods, resolve_layers
from dfcvae.loss import check_feature_shift, dfc_vae_loss, feature_distances, kl_warmup
from dfcvae.lpips_metric import LPIPS
from dfcvae.metrics import active_units, lattice_ratio, phase_energy
from dfcvae.model import DFCVAE
from dfcvae.shards.loader import prepare_batch, train_stream


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the weights stopped being finite: the same config fails the same way again,
    so the run stops instead of retrying."""


def seed_step(seed: int, rank: int, step: int) -> torch.Generator:
    """Seed the global RNG for one step and return a CPU generator for data augmentation."""
    value = (seed * 1_000_003 + rank * 10_007 + step) % (2**63)
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


def build_model(cfg: Config, runtime: Runtime) -> DFCVAE:
    model = DFCVAE(cfg.model, cfg.data.image_size)
    return model.to(runtime.device, memory_format=runtime.memory_format)


def build_perceptual(cfg: Config, runtime: Runtime) -> PerceptualNetwork | None:
    if cfg.loss.perceptual_weight == 0:
        return None
    net = PerceptualNetwork.from_config(cfg.perceptual)
    return net.to(runtime.device, memory_format=runtime.memory_format)


def build_lpips(cfg: Config, runtime: Runtime) -> LPIPS | None:
    """The frozen LPIPS network for loss.lpips_weight > 0 (loss.lpips_net, loss.lpips_weights), else None."""
    if cfg.loss.lpips_weight == 0:
        return None
    return LPIPS(cfg.loss.lpips_net, cfg.loss.lpips_weights, setting="loss.lpips").to(runtime.device)


def check_config(cfg: Config) -> None:
    """What would otherwise fail inside the Ray workers, checked in the driver in a second:
    ConfigError naming the key (image size, layers, feature shift, EMA decay; the closed choices
    are checked where the config is read)."""
    with torch.device("meta"):  # shapes only, no memory
        DFCVAE(cfg.model, cfg.data.image_size)
    if cfg.loss.perceptual_weight > 0:
        resolve_layers(cfg.perceptual.backbone, cfg.perceptual.layers)
    check_feature_shift(cfg.loss.feature_shift, cfg.data.image_size)
    check_ema_decay(cfg)


# optim.schedule: the learning rate's factor at fraction t of train.steps, floor optim.min_lr_fraction.
SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": lambda t, floor: 1.0,
    "exponential": lambda t, floor: floor**t,
    "cosine": lambda t, floor: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)),
}


def lr_factor(cfg: Config) -> Callable[[int], float]:
    steps, floor, schedule = max(cfg.train.steps, 1), cfg.optim.min_lr_fraction, SCHEDULES[cfg.optim.schedule]
    return lambda step: schedule(min(step, steps) / steps, floor)


def build_optimizer(model: nn.Module, cfg: Config, runtime: Runtime):
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
        fused=runtime.on_gpu,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    return optimizer, scheduler


# torch.compile modes -> whether they replay CUDA graphs (which reuse their output memory).
COMPILE_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}


def compiled(fn: Callable, cfg: Config, runtime: Runtime) -> tuple[Callable, bool]:
    """fn under torch.compile when train.compile and on GPU; -> (callable, uses CUDA graphs)."""
    mode = cfg.train.compile_mode
    if not (cfg.train.compile and runtime.on_gpu):
        return fn, False
    return torch.compile(fn, mode=mode), COMPILE_MODES[mode]


def check_ema_decay(cfg: Config) -> float:
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay {cfg.train.ema_decay} must be in [0, 1): 0 is off, 0.999 is typical.")
    return cfg.train.ema_decay


def ema_with_warmup(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """AveragedModel's multi_avg_fn for an EMA whose decay at update n (n >= 1, the 0-dim count
    tensor AveragedModel passes, never read on the host) is min(decay, (1 + n) / (10 + n)), as
    tf.train.ExponentialMovingAverage's num_updates: a short run's EMA follows its weights, where
    a constant 0.99 still gives the first ones 49% after 70 updates (and a 40-step search trial's
    score would be the untrained model's). From about 900 updates on it is torch's
    get_ema_multi_avg_fn(decay). Integer buffers (BatchNorm's num_batches_tracked) are copied.
    AveragedModel calls it once per device and dtype, so each call is one fused foreach op."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], n: Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_lerp_(averaged, current, (1 - d).to(averaged[0].dtype))

    return update


def build_ema(cfg: Config, model: nn.Module, state: dict | None = None) -> AveragedModel | None:
    """torch's AveragedModel with EMA averaging (train.ema_decay, warmed up: `ema_with_warmup`) of
    the VAE's parameters and buffers, or None when off; restored from a checkpoint's "ema" entry
    when it has one, so a resumed run averages exactly as the uninterrupted one."""
    if check_ema_decay(cfg) == 0:
        return None
    ema = AveragedModel(unwrap(model), multi_avg_fn=ema_with_warmup(cfg.train.ema_decay), use_buffers=True)
    if state is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(int(state["ema_updates"]))
    return ema


def evaluated_model(model: nn.Module, ema: AveragedModel | None) -> DFCVAE:
    """The VAE that validation, grids and model.pt show: the EMA's when it is on."""
    return ema.module if ema is not None else unwrap(model)


def make_train_step(
    model: nn.Module,
    perceptual: PerceptualNetwork | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    runtime: Runtime,
    ema: AveragedModel | None = None,
) -> Callable[[Tensor], dict[str, Tensor]]:
    """x in [-1, 1] (B, 3, H, W) on the device -> detached logs; one optimiser update (and one
    EMA update when ema is given).

    The KL warm-up's factor follows the scheduler's step count, which checkpoints carry, so a
    resumed run weighs KL exactly as the uninterrupted one.
    """

    lpips = build_lpips(cfg, runtime)
    lpips = lpips.distance if lpips is not None else None

    def forward_loss(x: Tensor, kl_scale: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with runtime.autocast():
            recon, mu, logvar = model(x)
            return dfc_vae_loss(x, recon, mu, logvar, perceptual, cfg.loss, kl_scale=kl_scale, lpips=lpips)

    compute, graphed = compiled(forward_loss, cfg, runtime)

    def step(x: Tensor) -> dict[str, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        kl_scale: float | Tensor = 1.0
        if cfg.loss.kl_warmup_steps > 0:  # a tensor, so torch.compile does not specialise on each value
            kl_scale = torch.tensor(kl_warmup(cfg.loss, scheduler.last_epoch), device=x.device)
        loss, logs = compute(x, kl_scale)
        if graphed:  # graph outputs are overwritten by the next replay; the logs outlive it
            logs = {k: v.clone() for k, v in logs.items()}
        loss.backward()
        if cfg.optim.grad_clip > 0:
            logs["train/grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        return logs

    return step


@torch.no_grad()
def validate(
    model: DFCVAE,
    perceptual: PerceptualNetwork | None,
    reference: PerceptualNetwork,
    batches: list[Tensor],
    cfg: Config,
    runtime: Runtime,
    lpips: LPIPS | None = None,
) -> dict[str, float]:
    """Loss parts, pixel MSE and the fixed-layer distance on fixed val batches (latent means),
    the lattice ratios (val/lattice_ratio_<p>, as the evaluation's test/ ones) and the active
    latent units over all of them (`metrics.active_units`). `lpips`: the loss's
    LPIPS network when loss.lpips_weight > 0 (`build_lpips`)."""
    model.eval()
    totals: dict[str, float] = {}
    means = []
    periods = lattice_periods(cfg)
    phases = {p: [0.0, 0.0] for p in periods}  # period -> phase maps of (reconstructions, val images)
    for x in batches:
        with runtime.autocast():
            mu, logvar = model.encode(x)
            means.append(mu.float())
            recon = model.decode(mu)
            _, logs = dfc_vae_loss(x, recon, mu, logvar, perceptual, cfg.loss, split="val", lpips=lpips)
            logs["val/reference_distance"] = sum(feature_distances(reference(x), reference(recon)).values())
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + float(value) / len(batches)
        for period, maps in phases.items():
            maps[0] = maps[0] + phase_energy(recon.float(), period)
            maps[1] = maps[1] + phase_energy(x.float(), period)
    ratios = {p: lattice_ratio(ours, theirs) for p, (ours, theirs) in phases.items()}
    totals |= {f"val/lattice_ratio_{p}": r for p, r in ratios.items()} | {"val/lattice_ratio": max(ratios.values())}
    means = torch.cat(means)
    if len(means) >= 2:  # a variance over the data needs two images
        units = active_units(means)
        totals |= {"val/active_units": float(units), "val/active_fraction": units / model.latent_dim}
    model.train()
    return totals


def train_in_process(cfg: Config, steps: int, runtime: Runtime, progress: bool = False) -> DFCVAE:
    """`steps` steps of cfg's recipe in this process, rank 0 of 1, without Ray, validation or
    checkpoints: the step and data stream the worker loop runs, for benchmarks and tests.
    -> the VAE in eval mode."""
    seed_step(cfg.train.seed, 0, -1)
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    ema = build_ema(cfg, model)
    step_fn = make_train_step(model, build_perceptual(cfg, runtime), optimizer, scheduler, cfg, runtime, ema)
    start = time.perf_counter()
    for step, batch in train_stream(cfg, device=runtime.device):
        if step >= steps:
            break
        generator = seed_step(cfg.train.seed, 0, step)
        logs = step_fn(prepare_batch(batch["image"], runtime.device, train=True, generator=generator))
        if progress and (step + 1) % max(steps // 5, 1) == 0:
            sys.stdout.write(
                f"[train] step {step + 1}/{steps} loss {float(logs['train/loss']):.4f} "
                f"kl {float(logs['train/kl']):.2f} ({time.perf_counter() - start:.0f} s)\n"
            )
            sys.stdout.flush()
    return evaluated_model(model, ema).eval()


def unwrap(model: nn.Module) -> DFCVAE:
    return model.module if hasattr(model, "module") else model
