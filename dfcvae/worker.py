"""The Ray Train per-worker loop, and the pieces it reports through.

`train_loop_per_worker` is the loop: resume, then for each step train, and at their intervals
log, validate, draw grids and report a checkpoint. Only the VAE is wrapped in DDP; each worker
builds its own frozen perceptual network. The data position and the randomness follow from the
step (`dfcvae.step.seed_step`), so a resumed run is the uninterrupted one, bit for bit on CPU.
Rank 0 validates, writes the step log (log.csv) and the checkpoints, and logs to MLflow.

A tuning trial passes its objective in `loop_config["objective"]` (a function of the model,
the config and the device: `dfcvae.evaluate.tuning_objective`); it is computed at each
validation and reported as `val/objective`.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from dfcvae import cluster, pictures, tracking
from dfcvae.checkpoint import (
    DamagedCheckpointError,
    all_finite,
    init_from_state,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from dfcvae.config import Config, ConfigError
from dfcvae.device import Runtime
from dfcvae.features import PerceptualNetwork, build_reference
from dfcvae.internals import process_group_network
from dfcvae.model import DFCVAE
from dfcvae.shards.loader import make_loader, prepare_batch, train_stream
from dfcvae.shards.plan import batches_per_epoch
from dfcvae.step import (
    NonFiniteLossError,
    build_ema,
    build_lpips,
    build_model,
    build_optimizer,
    build_perceptual,
    evaluated_model,
    make_train_step,
    seed_step,
    unwrap,
    validate,
)

LOG_FILE = "log.csv"
GRID_SAMPLES = 64  # prior samples in the training grid, 8 per row
GRID_RECONSTRUCTIONS = 16  # val inputs above their reconstructions


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    if loop_config.get("mlflow_uri"):  # so train.init_from: models:/... resolves against the same store
        os.environ.setdefault("MLFLOW_TRACKING_URI", loop_config["mlflow_uri"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    runtime = Runtime(ray.train.torch.get_device())
    node_id = ray.get_runtime_context().get_node_id()  # where this rank runs, in every report
    where = {"node_id": node_id, "node_address": ray.util.get_node_ip_address(), **process_group_network()}
    if loop_config.get("storage_node") not in (None, node_id):  # a worker the cluster placed elsewhere
        raise ConfigError(cluster.local_storage_message(cfg, f"another node than the driver's (rank {rank})"))
    torch.backends.cudnn.benchmark = runtime.on_gpu
    seed_step(cfg.train.seed, rank, -1)

    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    start, state = resume(cfg, model, optimizer, scheduler)
    ema = build_ema(cfg, model, state)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    perceptual = build_perceptual(cfg, runtime)
    train_step = make_train_step(model, perceptual, optimizer, scheduler, cfg, runtime, ema)
    history = History(cfg, loop_config, rank, start)
    throughput, guard = Throughput(cfg, rank, start), LossGuard()
    validation = Validation(cfg, runtime, loop_config.get("objective")) if rank == 0 else None
    due, per_epoch = Intervals(cfg), batches_per_epoch(cfg, "train", world)

    for step, images in batches_from(cfg, rank, world, start, runtime.device):
        if step >= cfg.train.steps:
            break
        generator = seed_step(cfg.train.seed, rank, step)
        logs = train_step(prepare_batch(images, runtime.device, train=True, generator=generator))
        done = step + 1
        guard.check(logs["train/loss"], done)  # the previous step's loss: the host never waits
        throughput.add(logs)
        if due.log(done) and guard.finite:
            history.add(throughput.summary(done, optimizer), done)
        if validation and due.val(done):
            history.add(validation(evaluated_model(model, ema), perceptual), done)
            history.warn_once_on_collapse(done)
        if validation and history.logger and due.grid(done):
            history.grids(validation.grids(evaluated_model(model, ema)), done)
        if due.checkpoint(done):
            values = {"step": done, "samples_seen": done * cfg.global_batch_size, "rank": rank, "restored_from": start}
            values |= where
            values |= digests(model, perceptual) | history.latest
            state = checkpoint_payload(model, optimizer, scheduler, done, cfg, per_epoch, ema) if rank == 0 else None
            report(values, state, history.rows)
    history.finish()


def resume(cfg: Config, model: DFCVAE, optimizer, scheduler) -> tuple[int, dict | None]:
    """Load Ray's latest checkpoint (after a failure) or train.init_from; -> (start step, the state)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # on object storage (s3://) as on a local or shared disk
        state = load_latest_intact(checkpoint)
    else:
        state = init_state(cfg)
    if state is None:
        return 0, None
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state


def load_latest_intact(checkpoint) -> dict:
    """Ray's latest checkpoint of the run; when it is damaged (a write cut short, a changed byte),
    the newest intact one before it, with one line saying so. DamagedCheckpointError when none of
    the run's checkpoints (train.keep_checkpoints of them) is intact."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, parent = checkpoint.filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    listed = fs.get_file_info(pafs.FileSelector(parent))
    earlier = sorted(  # Ray names them checkpoint_<timestamp>: by name is by time
        (i.path for i in listed if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    damaged = []
    for path in [checkpoint.path, *(p for p in earlier if p < checkpoint.path)]:
        try:
            with Checkpoint(path, filesystem=fs).as_directory() as local:
                state = load_checkpoint(Path(local))
        except DamagedCheckpointError as err:
            damaged.append(str(err))
            continue
        if damaged:
            print(f"train: {damaged[0]} Resumed from the intact {path} instead.", file=sys.stderr, flush=True)
        return state
    raise DamagedCheckpointError(
        f"every checkpoint of this run in {parent} is damaged ({damaged[0]}): delete the folder to train from step 0."
    )


def init_state(cfg: Config) -> dict | None:
    """train.init_from's state (init_from_state), or None when it is not set."""
    return init_from_state(cfg.train.init_from) if cfg.train.init_from else None


def batches_from(
    cfg: Config, rank: int, world: int, start_step: int, device: torch.device
) -> Iterator[tuple[int, Tensor]]:
    """(step, uint8 images on `device`) from start_step on, across epochs; the position follows from the step."""
    for step, batch in train_stream(cfg, rank=rank, world_size=world, start=start_step, device=device):
        yield step, batch["image"]


def fixed_val_batches(cfg: Config, runtime: Runtime) -> list[Tensor]:
    """The first train.val_batches validation batches, in [-1, 1] on the device: the same images
    at every validation of every run."""
    loader = make_loader(cfg, "val", train=False, num_workers=0)
    batches = []
    for batch in loader:
        if len(batches) == cfg.train.val_batches:
            break
        batches.append(prepare_batch(batch["image"], runtime.device, train=False))
    return batches


# ---------------------------------------------------------------- the loop's pieces


class Intervals:
    """Whether a step (1-based, steps done) is due for logging, validation, grids, a checkpoint:
    every train.<x>_every steps and at the last step."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.train

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.cfg.steps

    def log(self, step: int) -> bool:
        return self._due(step, self.cfg.log_every)

    def val(self, step: int) -> bool:
        return self._due(step, self.cfg.val_every)

    def grid(self, step: int) -> bool:
        return self._due(step, self.cfg.grid_every)

    def checkpoint(self, step: int) -> bool:
        return self._due(step, self.cfg.checkpoint_every)


class LossGuard:
    """Stops the run at a non-finite training loss, checked one step late so that reading the
    loss never makes the host wait for the device inside a step."""

    def __init__(self) -> None:
        self.last: Tensor | None = None

    def check(self, loss: Tensor, step: int) -> None:
        """Raises NonFiniteLossError if the loss of step `step - 1` was not finite."""
        if self.last is not None and not torch.isfinite(self.last):
            raise NonFiniteLossError(
                f"non-finite training loss at step {step - 1} ({float(self.last)}); stopping. "
                "Lower optim.lr, enable optim.grad_clip, or check the loss weights."
            )
        self.last = loss

    @property
    def finite(self) -> bool:
        return self.last is None or bool(torch.isfinite(self.last))


class Throughput:
    """Means of the step logs since the last summary, the learning rate, images per second
    (global batch), and on rank 0 a status line with the time left."""

    def __init__(self, cfg: Config, rank: int, start_step: int):
        self.cfg, self.rank = cfg, rank
        self.tick, self.tick_step = time.perf_counter(), start_step
        self.pending: list[dict[str, Tensor]] = []

    def add(self, logs: dict[str, Tensor]) -> None:
        self.pending.append(logs)

    def summary(self, step: int, optimizer) -> dict[str, float]:
        elapsed = time.perf_counter() - self.tick
        steps_done = max(step - self.tick_step, 1)
        ips = steps_done * self.cfg.global_batch_size / max(elapsed, 1e-9)
        means = {k: float(torch.stack([p[k] for p in self.pending]).mean()) for k in self.pending[-1]}
        means |= {"train/lr": optimizer.param_groups[0]["lr"], "train/images_per_s": ips}
        self.pending.clear()
        self.tick, self.tick_step = time.perf_counter(), step
        if self.rank == 0:
            eta = (self.cfg.train.steps - step) * elapsed / steps_done
            # Written, not print()ed: Ray Train patches print() in its workers to log each line
            # as well, and the driver then shows every status line twice.
            sys.stdout.write(
                f"[train] step {step}/{self.cfg.train.steps} loss {means['train/loss']:.4f} "
                f"kl {means['train/kl']:.3f} {ips:,.0f} img/s eta {tqdm.format_interval(max(int(eta), 0))}\n"
            )
            sys.stdout.flush()
        return means


class Validation:
    """Rank 0's validation: `step.validate` on fixed val batches, the fixed-layer reference
    distance, the tuning objective when given, and the training grids."""

    def __init__(self, cfg: Config, runtime: Runtime, objective: Callable[..., dict[str, float]] | None):
        self.cfg, self.runtime, self.objective = cfg, runtime, objective
        self.reference = build_reference(cfg, runtime)
        self.batches = fixed_val_batches(cfg, runtime)
        self.lpips = build_lpips(cfg, runtime)

    def __call__(self, model: DFCVAE, perceptual: PerceptualNetwork | None) -> dict[str, float]:
        values = validate(model, perceptual, self.reference, self.batches, self.cfg, self.runtime, self.lpips)
        if self.objective:
            values |= self.objective(model, self.cfg, self.runtime.device)
        return values

    def grids(self, model: DFCVAE) -> dict[str, tuple[Tensor, int]]:
        """name -> (images, per row): prior samples from a fixed seed, val inputs over reconstructions."""
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        return {
            "samples": pictures.sample_grid(model, GRID_SAMPLES, generator, nrow=8),
            "reconstructions": pictures.reconstruction_grid(model, self.batches[0][:GRID_RECONSTRUCTIONS]),
        }


class History:
    """The run's rows (step, values): kept on rank 0 for log.csv, sent to MLflow, and the
    latest values, which every rank's Ray report carries."""

    def __init__(self, cfg: Config, loop_config: dict[str, Any], rank: int, start_step: int):
        self.cfg, self.rank = cfg, rank
        self.latest: dict[str, float] = {}
        self.rows: list[dict[str, float]] = previous_rows(start_step) if rank == 0 else []
        run_id = loop_config.get("mlflow_run_id") if rank == 0 else None
        self.logger = tracking.RunLogger(loop_config["mlflow_uri"], run_id) if run_id else None
        self.warned_collapse = False
        self.system = None
        if self.logger and cfg.train.system_metrics_s > 0:
            self.system = tracking.system_metrics(
                loop_config["mlflow_uri"], run_id, cfg.train.system_metrics_s, start_step > 0
            )

    def add(self, values: dict[str, float], step: int) -> None:
        self.latest |= values
        if self.rank != 0:
            return
        row = {"step": step, **values}
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(row)
        else:
            self.rows.append(row)
        if self.logger:
            self.logger.metrics(values, step)

    def warn_once_on_collapse(self, step: int) -> None:
        """A loud warning, once per run, when too few latent units are active after the KL warm-up."""
        fraction = self.latest.get("val/active_fraction")
        message = None if self.warned_collapse or fraction is None else collapse_warning(self.cfg, step, fraction)
        if message is None:
            return
        self.warned_collapse = True
        sys.stdout.write(message)
        sys.stdout.flush()
        if self.logger:
            self.logger.tag("warning.posterior_collapse", f"step {step}: {fraction:.3f}")

    def grids(self, grids: dict[str, tuple[Tensor, int]], step: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (images, nrow) in grids.items():
                path = pictures.save_grid(images, Path(tmp) / f"{name}_step{step:07d}.png", nrow)
                self.logger.artifact(path, f"grids/{name}")

    def finish(self) -> None:
        if self.system:
            self.system.finish()
        if self.logger:
            steps = self.cfg.train.steps
            self.logger.metrics({"train/samples_seen": steps * self.cfg.global_batch_size}, steps)


def digests(model, perceptual: PerceptualNetwork | None) -> dict[str, str]:
    """The VAE's parameters (DDP keeps them identical on every rank; BatchNorm running statistics
    are per rank between forwards, rank 0's are checkpointed) and the frozen network's state."""
    return {
        "weights_sha256": state_digest(dict(unwrap(model).named_parameters())),
        "perceptual_sha256": state_digest(perceptual.state_dict()) if perceptual else "none",
    }


def report(values: dict[str, Any], state: dict | None, rows: list[dict[str, float]]) -> None:
    """Report to Ray Train; with a state (rank 0), as a checkpoint directory holding it and the step log."""
    import ray.train

    if state is None:
        ray.train.report(values)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(state, Path(tmp))
        write_log(rows, Path(tmp) / LOG_FILE)
        ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------- checkpoints and the step log


def checkpoint_payload(
    model, optimizer, scheduler, step: int, cfg: Config, batches_per_epoch: int, ema: AveragedModel | None = None
) -> dict:
    """What a checkpoint holds; NonFiniteLossError when the weights are not finite."""
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
        "step": step,
        "epoch": step // batches_per_epoch,
        "batch_in_epoch": step % batches_per_epoch,
        "samples_seen": step * cfg.global_batch_size,
        "config": cfg.to_dict(),
    }


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


def previous_rows(start_step: int) -> list[dict[str, float]]:
    """The step log up to start_step from Ray's latest checkpoint, when resuming after a failure."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as local:
        return [row for row in read_log(Path(local) / LOG_FILE) if row["step"] <= start_step]


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
