"""Training on Ray Train (DDP), tracked in MLflow: the driver.

`train(cfg)` is the train stage's work: check the config, start or join Ray, run
`dfcvae.worker.train_loop_per_worker` on scaling.num_workers workers, retry what a retry can fix
(`fit`), and write the outputs (train.out_dir): model.pt (VAE weights + config), metrics.json,
log.csv (per-step curves for `dvc plots`), run.json (the MLflow run id), reports.jsonl (every
rank's report: steps and weight digests).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from dfcvae import cluster, tracking
from dfcvae.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    load_checkpoint,
    pin_init_from,
    published,
    save_checkpoint,
)
from dfcvae.config import Config, ConfigError, UserError
from dfcvae.files import staging_dir, swap_in, write_json
from dfcvae.internals import lost_worker, torch_config
from dfcvae.shards.format import manifest_hash, read_manifest
from dfcvae.step import check_config
from dfcvae.worker import LOG_FILE, read_log, train_loop_per_worker, write_log

# Ray Train's wait for the nodes of a worker group (Ray Train V2), read by its controller.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class ClusterError(UserError, RuntimeError):
    """The cluster cannot run the configured workers: no nodes for them within scaling.node_wait_s."""


def check_storage(cfg: Config, nodes: int) -> None:
    """ConfigError for a local scaling.storage_dir on a cluster of several nodes: a checkpoint on
    one node's disk does not survive that node, so the restart after its loss would find none.
    An autoscaling cluster may have one node at start: each worker checks again where it runs
    (`worker.train_loop_per_worker`: the loop config's storage_node)."""
    if nodes > 1 and cluster.local_storage(cfg):
        raise ConfigError(cluster.local_storage_message(cfg, f"a cluster of {nodes} nodes"))


def identity_digest(cfg: Config, manifest_hash: str, code: str) -> str:
    """A digest of what a result depends on: the settings (Config.identity, no locations), the data
    (the shards' manifest hash) and the code (the dfcvae package's digest)."""
    identity = {"config": cfg.identity(), "manifest_hash": manifest_hash, "code": code}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def run_name(cfg: Config, manifest_hash: str, code: str) -> str:
    """A rerun after an interruption has the same name, wherever the checkout lies, and resumes
    from Ray's checkpoints under scaling.storage_dir; new data, code or settings train from step 0."""
    return f"train-{identity_digest(cfg, manifest_hash, code)}"


def train(cfg: Config) -> dict[str, float]:
    """Train cfg's model on its shards; -> the final metrics (also train.out_dir/metrics.json).
    train.out_dir is replaced whole when the run ends; while it trains, its reports.jsonl is in
    `<train.out_dir>.partial/`. Raises ConfigError (before any Ray work), NonFiniteLossError, or
    Ray's TrainingFailedError after scaling.max_failures retries."""
    check_config(cfg)
    cfg = absolute_paths(cfg)
    uri = tracking.setup(cfg.mlflow)
    # Checked once, here (in the workers it would fail on every retry), and pinned for them; the run's
    # name keeps the source as given.
    init_from = pin_init_from(cfg) if cfg.train.init_from else ""
    if "://" in cfg.scaling.storage_dir:
        cluster.check_remote_storage(cfg.scaling.storage_dir)
    manifest, data_hash = read_manifest(cfg), manifest_hash(cfg)
    run_id = tracking.start_run(cfg, "train", tracking.run_tags(cfg, manifest, data_hash), data="training")
    logger = tracking.RunLogger(uri, run_id)
    # The run writes beside the previous outputs (its reports.jsonl there while it trains) and
    # swaps them in when it ends: a failed or interrupted run leaves the previous model whole.
    target = Path(cfg.train.out_dir)
    out_dir = staging_dir(target, ("run.json", MODEL_FILE, "metrics.json", "reports.jsonl", LOG_FILE))
    cfg = cfg.with_overrides({"train.out_dir": str(out_dir)})
    try:
        cluster.init_ray()
        check_storage(cfg, cluster.alive_nodes())
        workers = cfg.with_overrides({"train.init_from": init_from})
        loop_config = {"config": workers.to_dict(), "mlflow_uri": uri, "mlflow_run_id": run_id}
        if cluster.local_storage(cfg):  # the workers check they run where the checkpoints will be read
            import ray

            loop_config["storage_node"] = ray.get_runtime_context().get_node_id()
        result = fit(cfg, loop_config, run_name(cfg, data_hash, tracking.code_digest()))
        with result.checkpoint.as_directory() as checkpoint_dir:
            metrics = export_outputs(Path(checkpoint_dir), out_dir)
        write_json(metrics, out_dir / "metrics.json")
        write_json({"run_id": run_id, "tracking_uri": uri}, out_dir / "run.json")
        swap_in(out_dir, target)
        for name in ("metrics.json", LOG_FILE):
            logger.artifact(target / name)
        logger.finish()
        return metrics
    except BaseException:
        logger.finish("FAILED")
        raise


def absolute_paths(cfg: Config) -> Config:
    """Local relative paths made absolute: Ray workers do not share the driver's cwd. The MLflow
    store's are the user's repository's (tracking.store_path), even from a DVC temp workspace."""
    keys = (
        "data.shards_dir",
        "data.inventory_dir",
        "scaling.storage_dir",
        "train.out_dir",
        "tune.out_dir",
        "eval.out_dir",
    )
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
    that DDP ranks stayed bit-identical and the perceptual network never changed; and where the
    rank ran: its node's id and address, the rendezvous store's address (rank 0) and gloo's
    interface (internals.process_group_network).
    """
    from ray.train import UserCallback

    keys = ("step", "rank", "restored_from", "samples_seen", "weights_sha256", "perceptual_sha256")
    keys += ("node_id", "node_address", "store", "socket_ifname")

    class ReportLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                for row in metrics:
                    handle.write(json.dumps({k: row.get(k) for k in keys}) + "\n")

    return ReportLog()


def make_trainer(cfg: Config, loop_config: dict[str, Any], name: str, callbacks: tuple = ()):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = cfg.scaling
    resources = {
        "CPU": scaling.cpus_per_worker,
        **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {}),
        **scaling.worker_resources,
    }
    os.environ[START_TIMEOUT_ENV] = str(scaling.node_wait_s)  # Ray Train passes it to its controller
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        torch_config=torch_config("nccl" if scaling.use_gpu else "gloo", socket_ifname=scaling.socket_ifname),
        run_config=RunConfig(
            name=name,
            storage_path=scaling.storage_dir,
            # Retried by fit(), which knows what a retry can fix; a worker group that cannot start
            # (no nodes within scaling.node_wait_s) fails instead of waiting again and again.
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[report_log_callback(Path(cfg.train.out_dir) / "reports.jsonl"), *callbacks],
        ),
    )


def fit(cfg: Config, loop_config: dict[str, Any], name: str, callbacks: tuple = ()):
    """Run the trainer; after a lost worker, node or loader process (internals.lost_worker), run it again
    under the same name, up to scaling.max_failures times (-1: no limit): Ray Train finds the
    run's checkpoints under scaling.storage_dir and the workers resume from the latest.
    Any other failure would repeat on every attempt, whoever raised it (this project's errors,
    MLflow's, Ray's, the operating system's: a missing alias, a full disk, an unreadable file),
    so it is raised at once, as the worker raised it. ClusterError when the workers' nodes do not
    come within scaling.node_wait_s.
    """
    from ray.train import ControllerError, TrainingFailedError

    limit = cfg.scaling.max_failures
    attempt = 1
    while True:
        try:
            return make_trainer(cfg, loop_config, name, callbacks).fit()
        except ControllerError as err:
            cause = getattr(err, "controller_failure", None)
            if "WorkerGroupStartupTimeoutError" not in f"{type(cause).__name__} {err}":
                raise
            raise ClusterError(no_nodes_message(cfg)) from None
        except TrainingFailedError as err:
            failures = list(getattr(err, "worker_failures", {}).values())
            lost = [f for f in failures if lost_worker(f)]
            if failures and not lost:
                raise next((f for f in failures if isinstance(f, UserError)), failures[0]) from None
            if 0 <= limit < attempt:
                raise
            sys.stdout.write(
                f"[train] attempt {attempt}: a worker was lost ({type(lost[0]).__name__ if lost else err}); "
                f"restarting from the latest checkpoint ({attempt} of "
                f"{'unlimited' if limit < 0 else limit} retries)\n"
            )
            sys.stdout.flush()
            attempt += 1


def no_nodes_message(cfg: Config) -> str:
    s = cfg.scaling
    need = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}), **s.worker_resources}
    each = ", ".join(f"{k} {v:g}" for k, v in need.items())
    return (
        f"no nodes for {s.num_workers} workers ({each} each, placement {s.placement_strategy}) came within "
        f"scaling.node_wait_s={s.node_wait_s:g} s; the cluster has {cluster.resources_summary()}: add nodes "
        "(or let the autoscaler), lower scaling.num_workers, or raise scaling.node_wait_s."
    )


def export_outputs(checkpoint_dir: Path, out_dir: Path) -> dict[str, float]:
    """The stage's outputs from the final checkpoint: VAE weights + config, metrics, the step log."""
    state = load_checkpoint(checkpoint_dir)
    rows = read_log(checkpoint_dir / LOG_FILE)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(published(state), out_dir)
    os.replace(out_dir / CHECKPOINT_FILE, out_dir / MODEL_FILE)
    write_log(rows, out_dir / LOG_FILE)
    metrics: dict[str, float] = {"step": state["step"], "samples_seen": state["samples_seen"]}
    for row in rows:
        metrics.update({k: v for k, v in row.items() if k.startswith(("train/", "val/"))})
    return metrics
