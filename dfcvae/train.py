"""Training: the step, validation, checkpoints, and the Ray Train per-worker loop.

Only the VAE is wrapped in DDP; each worker builds its own frozen perceptual
network. Randomness is derived from (seed, rank, step), so a run resumed from
a checkpoint draws exactly the numbers the uninterrupted run would have drawn,
on every rank, and the data position follows from the step.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dfcvae import data, tracking
from dfcvae.checkpoint import CHECKPOINT_FILE, MODEL_FILE, all_finite, load_checkpoint, load_registered, save_checkpoint
from dfcvae.config import Config, ConfigError, UserError
from dfcvae.device import Runtime
from dfcvae.evaluate import tuning_objective
from dfcvae.features import PerceptualNetwork, build_reference, resolve_layers
from dfcvae.loss import check_feature_norm, dfc_vae_loss, feature_distances, kl_warmup
from dfcvae.metrics import active_units
from dfcvae.model import DFCVAE

LOG_FILE = "log.csv"


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the weights stopped being finite: the same config fails the same way again,
    so the run stops instead of retrying."""


# ---------------------------------------------------------------- device, seeds


def seed_step(seed: int, rank: int, step: int) -> torch.Generator:
    """Seed the global RNG for one step and return a CPU generator for data augmentation."""
    value = (seed * 1_000_003 + rank * 10_007 + step) % (2**63)
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


# ---------------------------------------------------------------- model, optimiser


def build_model(cfg: Config, runtime: Runtime) -> DFCVAE:
    model = DFCVAE(cfg.model, cfg.data.image_size)
    return model.to(runtime.device, memory_format=runtime.memory_format)


def build_perceptual(cfg: Config, runtime: Runtime) -> PerceptualNetwork | None:
    if cfg.loss.perceptual_weight == 0:
        return None
    net = PerceptualNetwork.from_config(cfg.perceptual)
    return net.to(runtime.device, memory_format=runtime.memory_format)


def check_config(cfg: Config) -> None:
    """What would otherwise fail inside the Ray workers, checked in the driver in a second:
    ConfigError naming the key (architecture, image size, layers, feature norm, schedule)."""
    with torch.device("meta"):  # shapes only, no memory
        DFCVAE(cfg.model, cfg.data.image_size)
    if cfg.loss.perceptual_weight > 0:
        resolve_layers(cfg.perceptual.backbone, cfg.perceptual.layers)
    check_feature_norm(cfg.loss.feature_norm)
    lr_factor(cfg)
    check_ema_decay(cfg)
    check_compile_mode(cfg)


def lr_factor(cfg: Config) -> Callable[[int], float]:
    steps, floor = max(cfg.train.steps, 1), cfg.optim.min_lr_fraction
    schedules = {
        "constant": lambda step: 1.0,
        "exponential": lambda step: floor ** (min(step, steps) / steps),
        "cosine": lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    }
    if cfg.optim.schedule not in schedules:
        raise ConfigError(f"optim.schedule '{cfg.optim.schedule}' is not one of {', '.join(schedules)}.")
    return schedules[cfg.optim.schedule]


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


# ---------------------------------------------------------------- step, validation


# torch.compile modes -> whether they replay CUDA graphs (which reuse their output memory).
COMPILE_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}


def check_compile_mode(cfg: Config) -> str:
    if cfg.train.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode '{cfg.train.compile_mode}' is not one of {', '.join(COMPILE_MODES)}.")
    return cfg.train.compile_mode


def compiled(fn: Callable, cfg: Config, runtime: Runtime) -> tuple[Callable, bool]:
    """fn under torch.compile when train.compile and on GPU; -> (callable, uses CUDA graphs)."""
    mode = check_compile_mode(cfg)
    if not (cfg.train.compile and runtime.on_gpu):
        return fn, False
    return torch.compile(fn, mode=mode), COMPILE_MODES[mode]


def check_ema_decay(cfg: Config) -> float:
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay {cfg.train.ema_decay} must be in [0, 1): 0 is off, 0.999 is typical.")
    return cfg.train.ema_decay


def build_ema(cfg: Config, model: nn.Module, state: dict | None = None) -> AveragedModel | None:
    """torch's AveragedModel with EMA averaging (train.ema_decay) of the VAE's parameters and
    buffers, or None when off; restored from a checkpoint's "ema" entry when it has one, so a
    resumed run averages exactly as the uninterrupted one."""
    if check_ema_decay(cfg) == 0:
        return None
    ema = AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
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

    def forward_loss(x: Tensor, kl_scale: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with runtime.autocast():
            recon, mu, logvar = model(x)
            return dfc_vae_loss(x, recon, mu, logvar, perceptual, cfg.loss, kl_scale=kl_scale)

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
) -> dict[str, float]:
    """Loss parts, pixel MSE and the fixed-layer distance on fixed val batches (latent means),
    and the active latent units over all of them (`metrics.active_units`)."""
    model.eval()
    totals: dict[str, float] = {}
    means = []
    for x in batches:
        with runtime.autocast():
            mu, logvar = model.encode(x)
            means.append(mu.float())
            recon = model.decode(mu)
            _, logs = dfc_vae_loss(x, recon, mu, logvar, perceptual, cfg.loss, split="val")
            logs["val/reference_distance"] = sum(feature_distances(reference(x), reference(recon)).values())
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + float(value) / len(batches)
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
    for step, batch in data.train_stream(cfg, device=runtime.device):
        if step >= steps:
            break
        generator = seed_step(cfg.train.seed, 0, step)
        logs = step_fn(data.prepare_batch(batch["image"], runtime.device, train=True, generator=generator))
        if progress and (step + 1) % max(steps // 5, 1) == 0:
            sys.stdout.write(
                f"[train] step {step + 1}/{steps} loss {float(logs['train/loss']):.4f} "
                f"kl {float(logs['train/kl']):.2f} ({time.perf_counter() - start:.0f} s)\n"
            )
            sys.stdout.flush()
    return evaluated_model(model, ema).eval()


# ---------------------------------------------------------------- checkpoints


def unwrap(model: nn.Module) -> DFCVAE:
    return model.module if hasattr(model, "module") else model


def state_digest(state: dict[str, Tensor]) -> str:
    """sha256 over a state_dict's names and bytes: equal digests, bit-identical tensors."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_payload(
    model, optimizer, scheduler, step: int, cfg: Config, batches_per_epoch: int, ema: AveragedModel | None = None
) -> dict:
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    if not all_finite(state):
        raise NonFiniteLossError(f"model weights are not finite at step {step}; no checkpoint written.")
    averaged = {}
    if ema is not None:  # the EMA's weights and update count: part of the exact-resume contract
        averaged = {
            "ema": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()},
            "ema_updates": int(ema.n_averaged),
        }
    return {
        "model": state,
        **averaged,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": {},  # bf16 autocast needs no loss scaling
        "step": step,
        "epoch": step // batches_per_epoch,
        "batch_in_epoch": step % batches_per_epoch,
        "samples_seen": step * cfg.global_batch_size,
        "rng": {"scheme": "seed_step(seed, rank, step)", "seed": cfg.train.seed},
        "config": cfg.to_dict(),
    }


def init_state(cfg: Config) -> dict | None:
    """A checkpoint to resume from (train.init_from): a path, or a models:/ URI (weights only)."""
    source = cfg.train.init_from
    if not source:
        return None
    if source.startswith("models:/"):  # weights only: a registered model starts a new run
        return {"model": load_registered(source)["model"], "step": 0}
    return load_checkpoint(source)


def write_log(rows: list[dict[str, float]], path: Path) -> None:
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k != "step", k))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def read_log(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


# ---------------------------------------------------------------- the worker loop


def batches_from(
    cfg: Config, rank: int, world: int, start_step: int, device: torch.device
) -> Iterator[tuple[int, Tensor]]:
    """(step, uint8 images on `device`) from start_step on, across epochs; the position follows from the step."""
    for step, batch in data.train_stream(cfg, rank=rank, world_size=world, start=start_step, device=device):
        yield step, batch["image"]


def fixed_val_batches(cfg: Config, runtime: Runtime) -> list[Tensor]:
    loader = data.make_loader(cfg, "val", train=False, num_workers=0)
    batches = []
    for batch in loader:
        if len(batches) == cfg.train.val_batches:
            break
        batches.append(data.prepare_batch(batch["image"], runtime.device, train=False))
    return batches


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.from_dict(loop_config["config"])
    import ray.train
    import ray.train.torch

    if loop_config.get("mlflow_uri"):  # so train.init_from: models:/... resolves against the same store
        os.environ.setdefault("MLFLOW_TRACKING_URI", loop_config["mlflow_uri"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    runtime = Runtime(ray.train.torch.get_device())
    if runtime.on_gpu:
        torch.backends.cudnn.benchmark = True
    seed_step(cfg.train.seed, rank, -1)

    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    start, state = resume(cfg, model, optimizer, scheduler)
    ema = build_ema(cfg, model, state)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    perceptual = build_perceptual(cfg, runtime)
    step_fn = make_train_step(model, perceptual, optimizer, scheduler, cfg, runtime, ema)
    reporter = Reporter(cfg, loop_config, rank, world, runtime, perceptual, start, ema)

    for step, images in batches_from(cfg, rank, world, start, runtime.device):
        if step >= cfg.train.steps:
            break
        generator = seed_step(cfg.train.seed, rank, step)
        logs = step_fn(data.prepare_batch(images, runtime.device, train=True, generator=generator))
        reporter.after_step(step + 1, logs, model, optimizer, scheduler)
    reporter.finish(model, optimizer, scheduler)


def resume(cfg: Config, model: DFCVAE, optimizer, scheduler) -> tuple[int, dict | None]:
    """Load Ray's latest checkpoint (after a failure) or train.init_from; -> (start step, the state)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    state = load_checkpoint(Path(checkpoint.path)) if checkpoint else init_state(cfg)
    if state is None:
        return 0, None
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state


class Reporter:
    """Logging, validation, grids, checkpoints and Ray reports at their intervals."""

    def __init__(self, cfg, loop_config, rank, world, runtime, perceptual, start_step, ema=None):
        self.cfg, self.rank, self.world, self.runtime = cfg, rank, world, runtime
        self.ema = ema  # when on, what validation, grids and checkpoints' "ema" show
        self.perceptual = perceptual
        self.start_step = start_step
        self.per_epoch = data.batches_per_epoch(cfg, "train", world)
        self.images_per_step = cfg.global_batch_size
        self.tick, self.tick_step = time.perf_counter(), start_step
        self.pending: list[dict[str, Tensor]] = []
        self.last_loss: Tensor | None = None
        self.latest: dict[str, float] = {}
        self.objective = loop_config.get("objective")
        self.warned_collapse = False
        self.logger = None
        self.rows: list[dict[str, float]] = []
        if rank == 0:
            self.rows = load_previous_rows(start_step)
            run_id = loop_config.get("mlflow_run_id")
            self.logger = tracking.RunLogger(loop_config["mlflow_uri"], run_id) if run_id else None
            self.reference = build_reference(cfg, runtime)
            self.val_batches = fixed_val_batches(cfg, runtime)
            self.fixed_z = torch.randn(
                64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.train.seed)
            )

    def after_step(self, step: int, logs: dict[str, Tensor], model, optimizer, scheduler) -> None:
        # Checked one step late so the host never waits on the device inside a step.
        if self.last_loss is not None and not torch.isfinite(self.last_loss):
            raise NonFiniteLossError(
                f"non-finite training loss at step {step - 1} ({float(self.last_loss)}); stopping. "
                "Lower optim.lr, enable optim.grad_clip, or check the loss weights."
            )
        self.last_loss = logs["train/loss"]
        self.pending.append(logs)
        cfg = self.cfg.train
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.log_train(step, optimizer)
        if self.rank == 0 and (step % cfg.val_every == 0 or step == cfg.steps):
            shown = evaluated_model(model, self.ema)
            values = validate(shown, self.perceptual, self.reference, self.val_batches, self.cfg, self.runtime)
            values.update(self.objective_metrics(shown))
            self.latest.update(values)
            self.log(values, step)
            if "val/active_fraction" in values:
                self.check_collapse(step, values["val/active_fraction"])
        if self.rank == 0 and self.logger and (step % cfg.grid_every == 0 or step == cfg.steps):
            self.log_grids(evaluated_model(model, self.ema), step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            self.report(step, model, optimizer, scheduler)

    def log_train(self, step: int, optimizer) -> None:
        if not torch.isfinite(self.last_loss):
            return  # raised at the next step; never log a non-finite loss as progress
        elapsed = time.perf_counter() - self.tick
        steps_done = max(step - self.tick_step, 1)
        ips = steps_done * self.images_per_step / max(elapsed, 1e-9)
        means = {k: float(torch.stack([p[k] for p in self.pending]).mean()) for k in self.pending[-1]}
        means.update({"train/lr": optimizer.param_groups[0]["lr"], "train/images_per_s": ips})
        self.latest.update(means)
        self.pending.clear()
        self.tick, self.tick_step = time.perf_counter(), step
        if self.rank == 0:
            self.log(means, step)
            eta = (self.cfg.train.steps - step) * elapsed / steps_done
            # Written, not print()ed: Ray Train patches print() in its workers to log each line
            # as well, and the driver then shows every status line twice.
            sys.stdout.write(
                f"[train] step {step}/{self.cfg.train.steps} loss {means['train/loss']:.4f} "
                f"kl {means['train/kl']:.3f} {ips:,.0f} img/s eta {format_seconds(eta)}\n"
            )
            sys.stdout.flush()

    def check_collapse(self, step: int, fraction: float) -> None:
        """Once per run: a loud warning when too few latent units are active after the KL warm-up."""
        message = None if self.warned_collapse else collapse_warning(self.cfg, step, fraction)
        if message is None:
            return
        self.warned_collapse = True
        sys.stdout.write(message)
        sys.stdout.flush()
        if self.logger:
            self.logger.client.set_tag(self.logger.run_id, "warning.posterior_collapse", f"step {step}: {fraction:.3f}")

    def objective_metrics(self, model: DFCVAE) -> dict[str, float]:
        if not self.objective:
            return {}
        return tuning_objective(model, self.cfg, self.runtime.device)

    def log(self, values: dict[str, float], step: int) -> None:
        row = {"step": step, **values}
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(row)
        else:
            self.rows.append(row)
        if self.logger:
            self.logger.metrics(values, step)

    def log_grids(self, model: DFCVAE, step: int) -> None:
        from torchvision.utils import save_image

        model.eval()
        with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
            samples = model.decode(self.fixed_z.to(self.runtime.device)).float()
            inputs = self.val_batches[0][:32]
            recon = model.decode(model.encode(inputs)[0]).float()
            pairs = torch.stack([inputs.float(), recon], 1).flatten(0, 1)  # input, reconstruction, ...
            for name, images, nrow in (("samples", samples, 8), ("reconstructions", pairs, 8)):
                path = Path(tmp) / f"{name}_step{step:07d}.png"
                save_image((images + 1) / 2, path, nrow=nrow)
                self.logger.artifact(path, f"grids/{name}")
        model.train()

    def report(self, step: int, model, optimizer, scheduler) -> None:
        import ray.train

        metrics = {
            "step": step,
            "samples_seen": step * self.images_per_step,
            "rank": self.rank,
            "restored_from": self.start_step,
            # Parameters only: DDP keeps them identical; BatchNorm running statistics are
            # per rank between forwards (rank 0's are the ones checkpointed).
            "weights_sha256": state_digest(dict(unwrap(model).named_parameters())),
            "perceptual_sha256": state_digest(self.perceptual.state_dict()) if self.perceptual else "none",
            **self.latest,
        }
        if self.rank != 0:
            ray.train.report(metrics)
            return
        payload = checkpoint_payload(model, optimizer, scheduler, step, self.cfg, self.per_epoch, self.ema)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(payload, Path(tmp))
            write_log(self.rows, Path(tmp) / LOG_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def finish(self, model, optimizer, scheduler) -> None:
        if self.logger:
            self.logger.metrics(
                {"train/samples_seen": self.cfg.train.steps * self.images_per_step}, self.cfg.train.steps
            )


def collapse_warning(cfg: Config, step: int, fraction: float) -> str | None:
    """The banner for a validation at `step` with `fraction` of the latent dimensions active, or
    None: after the KL warm-up, under train.warn_active_fraction is a collapsing posterior."""
    limit = cfg.train.warn_active_fraction
    if step < cfg.loss.kl_warmup_steps or fraction >= limit:
        return None
    bar = "!" * 78
    return (
        f"{bar}\nWARNING: POSTERIOR COLLAPSE at step {step}: {fraction:.0%} of the latent dimensions are "
        f"active (train.warn_active_fraction {limit:.0%}).\nThe decoder is ignoring the code: lower "
        f"loss.kl_weight (now {cfg.loss.kl_weight:g}) or set loss.kl_warmup_steps.\n{bar}\n"
    )


def load_previous_rows(start_step: int) -> list[dict[str, float]]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return []
    return [row for row in read_log(Path(checkpoint.path) / LOG_FILE) if row["step"] <= start_step]


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# ---------------------------------------------------------------- the driver


def absolute_paths(cfg: Config) -> Config:
    """Local relative paths made absolute: Ray workers do not share the driver's cwd. The MLflow
    store's are the user's repository's (tracking.store_path), even from a DVC temp workspace."""
    keys = ("data.shards_dir", "data.raw_dir", "scaling.storage_dir", "train.out_dir", "tune.out_dir", "eval.out_dir")
    flat = cfg.flat()
    paths = {k: str(Path(flat[k]).resolve()) for k in keys if flat[k] and "://" not in flat[k]}
    paths |= {
        k: str(tracking.store_path(flat[k]))
        for k in ("mlflow.local_db", "mlflow.local_artifacts")
        if flat[k] and "://" not in flat[k]
    }
    return cfg.with_overrides(paths)


def report_log_callback(path: Path):
    """A Ray Train callback appending every rank's report to a JSON-lines audit log.

    Each line holds the rank's step, VAE digest and frozen-network digest: the record
    that DDP ranks stayed bit-identical and the perceptual network never changed.
    """
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            keys = ("step", "rank", "restored_from", "samples_seen", "weights_sha256", "perceptual_sha256")
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                for row in metrics:
                    handle.write(json.dumps({k: row.get(k) for k in keys}) + "\n")

    return ReportLog()


def make_trainer(cfg: Config, loop_config: dict[str, Any], name: str, callbacks: tuple = ()):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=scaling.storage_dir,
            failure_config=FailureConfig(max_failures=0),  # retried by fit(), which knows what a retry can fix
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[report_log_callback(Path(cfg.train.out_dir) / "reports.jsonl"), *callbacks],
        ),
    )


def fit(cfg: Config, loop_config: dict[str, Any], name: str, callbacks: tuple = ()):
    """Run the trainer; after a failure a retry can fix (a lost worker or node), run it again
    under the same name, up to scaling.max_failures times (-1: no limit): Ray Train finds the
    run's checkpoints under scaling.storage_dir and the workers resume from the latest.
    A failure that repeats on every attempt (NonFiniteLossError, another UserError: a bad
    config or bad data) is raised at once, as the workers raised it.
    """
    from ray.train import TrainingFailedError

    limit = cfg.scaling.max_failures
    attempt = 1
    while True:
        try:
            return make_trainer(cfg, loop_config, name, callbacks).fit()
        except TrainingFailedError as err:
            failures = list(getattr(err, "worker_failures", {}).values())
            deterministic = [f for f in failures if isinstance(f, UserError)]
            if deterministic:
                raise deterministic[0] from None
            if 0 <= limit < attempt:
                raise
            sys.stdout.write(
                f"[train] attempt {attempt} failed ({type(err).__name__}: {str(err)[:300]}); "
                f"restarting from the latest checkpoint ({attempt} of "
                f"{'unlimited' if limit < 0 else limit} retries)\n"
            )
            sys.stdout.flush()
            attempt += 1


def export_outputs(checkpoint_dir: Path, out_dir: Path) -> dict[str, float]:
    """The stage's outputs from the final checkpoint: VAE weights + config, metrics, the step log."""
    state = load_checkpoint(checkpoint_dir)
    rows = read_log(checkpoint_dir / LOG_FILE)
    out_dir.mkdir(parents=True, exist_ok=True)
    # With train.ema_decay on, the EMA's weights are the model: evaluated, registered, served.
    final = {"model": state.get("ema", state["model"]), "config": state["config"], "step": state["step"]}
    save_checkpoint(final, out_dir)
    os.replace(out_dir / CHECKPOINT_FILE, out_dir / MODEL_FILE)
    write_log(rows, out_dir / LOG_FILE)
    metrics: dict[str, float] = {"step": state["step"], "samples_seen": state["samples_seen"]}
    for row in rows:
        metrics.update({k: v for k, v in row.items() if k.startswith(("train/", "val/"))})
    return metrics
