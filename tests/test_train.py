"""Training on a real local Ray cluster with MLflow on SQLite, on synthetic shards."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import threading
import time
import zipfile
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from dfcvae.checkpoint import (
    DamagedCheckpointError,
    init_from_state,
    load_checkpoint,
    pin_init_from,
    save_checkpoint,
    state_digest,
)
from dfcvae.config import Config, ConfigError
from dfcvae.device import Runtime
from dfcvae.features import PerceptualNetwork
from dfcvae.model import DFCVAE
from dfcvae.step import (
    NonFiniteLossError,
    build_model,
    build_optimizer,
    build_perceptual,
    make_train_step,
    seed_step,
)
from dfcvae.train import train
from tests.conftest import LOOPBACK, assert_loopback_only, listening_sockets

pytestmark = pytest.mark.timeout(600)


@pytest.fixture()
def run_cfg(synthetic_cfg: Config, tmp_path: Path, monkeypatch) -> Config:
    """A tiny 2-worker CPU run writing everything under tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return synthetic_cfg.with_overrides(
        {
            "scaling.num_workers": 2,
            "scaling.use_gpu": False,
            "scaling.cpus_per_worker": 0.5,
            "scaling.max_failures": 0,
            "scaling.storage_dir": str(tmp_path / "ray"),
            "train.out_dir": str(tmp_path / "train"),
            "train.steps": 6,
            "train.log_every": 2,
            "train.val_every": 3,
            "train.val_batches": 1,
            "train.checkpoint_every": 3,
            "train.grid_every": 6,
            "loader.num_workers": 1,
            "mlflow.local_artifacts": str(tmp_path / "artifacts"),
        }
    )


@pytest.mark.slow
def test_the_local_cluster_listens_on_loopback_only(ray_cluster):
    """GCS, raylet, dashboard and job API, agents, the driver and its workers: 127.0.0.1 only."""
    import ray

    @ray.remote(num_cpus=0.5)
    def node_address() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(node_address.remote()) == "127.0.0.1"
    assert_loopback_only(os.getpid(), at_least=6)


def sockets_while(thread: threading.Thread, root_pid: int) -> list[tuple[str, int, str, str]]:
    """(address, port, process, role) of every listening TCP socket seen in root_pid's process tree
    while `thread` runs; role is "worker" for a Ray Train worker, "loader" for its DataLoader
    processes, else "ray".

    A DataLoader process lives about a second of a 6-step run, and a whole-tree scan on a loaded
    machine missed it when polling every 0.5 s and every 0.1 s. So the process list alone is polled
    every 20 ms, and each DataLoader process is read the moment it appears, held with SIGSTOP while
    its sockets are listed, so that it cannot exit in between. The whole tree is scanned every 0.5 s."""
    seen, loaders, others, last_scan = set(), set(), set(), 0.0

    def is_loader(proc: psutil.Process) -> bool:  # forked: its own command line is the worker's
        parent = proc.parent()
        return parent is not None and "RayTrainWorker" in " ".join(parent.cmdline())

    while thread.is_alive():
        for proc in psutil.Process(root_pid).children(recursive=True):
            if proc.pid in loaders or proc.pid in others:
                continue
            try:
                if not is_loader(proc):
                    others.add(proc.pid)
                    continue
                proc.suspend()
                try:
                    name = proc.name()
                    listening = [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
                finally:
                    proc.resume()
                loaders.add(proc.pid)
                seen.update((c.laddr.ip, c.laddr.port, name, "loader") for c in listening)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if time.monotonic() - last_scan > 0.5:
            last_scan = time.monotonic()
            for ip, port, proc in listening_sockets(root_pid):
                if proc.pid in loaders:
                    continue
                try:
                    worker = "RayTrainWorker" in " ".join(proc.cmdline())
                    role = "loader" if is_loader(proc) else "worker" if worker else "ray"
                    seen.add((ip, port, proc.name(), role))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        time.sleep(0.02)
    return sorted(seen)


@pytest.mark.slow
def test_two_worker_ddp_run_tracks_and_keeps_ranks_in_sync(ray_cluster, run_cfg):
    """Also: while it trains, every socket listening in the cluster's processes (the process
    group's rendezvous store and gloo in the workers, and what their DataLoader processes
    inherit) is on 127.0.0.1."""
    outcome = {}
    run_cfg = run_cfg.with_overrides({"train.system_metrics_s": 1})  # a sample within the short run
    driver = threading.Thread(target=lambda: outcome.update(metrics=train(run_cfg)), daemon=True)
    driver.start()
    sockets = sockets_while(driver, os.getpid())
    metrics = outcome["metrics"]
    assert {role for *_, role in sockets} >= {"worker", "loader"}, sockets
    assert not [s for s in sockets if s[0] not in LOOPBACK], f"listening beyond 127.0.0.1: {sockets}"
    out = Path(run_cfg.train.out_dir)
    assert metrics["step"] == 6 and metrics["samples_seen"] == 6 * run_cfg.global_batch_size
    # Every rank reported the same VAE digest, and the frozen network's digest did not move.
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert {r["step"] for r in reports} == {3, 6} and {r["rank"] for r in reports} == {0, 1}
    for step in (3, 6):
        assert len({r["weights_sha256"] for r in reports if r["step"] == step}) == 1
    fresh = PerceptualNetwork.from_config(run_cfg.perceptual)
    assert {r["perceptual_sha256"] for r in reports} == {state_digest(fresh.state_dict())}
    # The model.pt output is the VAE alone, loadable as plain data.
    state = load_checkpoint(out / "model.pt")
    assert set(state) == {"model", "config", "step"}
    assert all(k.startswith(("encoder.", "decoder.")) for k in state["model"])
    # MLflow: params, metric histories, grid PNGs, tags.
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.kl_weight"] == str(run_cfg.loss.kl_weight)
    assert run.data.tags["data.synthetic"] == "true" and run.data.tags["perceptual.backbone"] == "mobilenet_v2"
    assert len(client.get_metric_history(run_id, "train/loss")) == 3
    # MLflow's system metrics from rank 0, and the shards it read as the run's dataset input.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    manifest_sha256 = (Path(run_cfg.data.shards_dir) / "manifest.sha256").read_text().split()[0]
    assert [(i.dataset.digest, i.tags[0].value) for i in run.inputs.dataset_inputs] == [
        (manifest_sha256[:36], "training")
    ]
    assert len(client.get_metric_history(run_id, "val/reference_distance")) == 2
    lattice = client.get_metric_history(run_id, "val/lattice_ratio")  # the validations' lattice measure
    assert len(lattice) == 2 and all(0 < m.value < 10 for m in lattice)
    grids = [
        a.path for folder in ("grids/samples", "grids/reconstructions") for a in client.list_artifacts(run_id, folder)
    ]
    assert sorted(Path(p).name for p in grids) == ["reconstructions_step0000006.png", "samples_step0000006.png"]
    assert (out / "log.csv").read_text().startswith("step,")


@pytest.mark.slow
def test_loss_falls_well_below_its_start_in_200_steps(synthetic_cfg):
    cfg = synthetic_cfg.with_overrides({"train.steps": 200, "optim.lr": 2e-3})
    runtime = Runtime(torch.device("cpu"))
    seed_step(0, 0, -1)
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    step = make_train_step(model, build_perceptual(cfg, runtime), optimizer, scheduler, cfg, runtime)
    from dfcvae.shards.loader import make_loader, prepare_batch

    batch = next(iter(make_loader(cfg, "train", train=False, num_workers=0)))
    x = prepare_batch(batch["image"], "cpu", train=False)
    losses = [float(step(x)["train/loss"]) for _ in range(200)]
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(ray_cluster, run_cfg, tmp_path):
    # The KL warm-up spans the interruption at step 4: its factor must continue, not restart. The
    # EMA of the weights is on: model.pt holds it, and it must continue too.
    base = run_cfg.with_overrides(
        {
            "scaling.num_workers": 1,
            "optim.schedule": "constant",
            "train.checkpoint_every": 4,
            "loss.kl_warmup_steps": 6,
            "train.ema_decay": 0.9,
        }
    )
    full = base.with_overrides({"train.steps": 8, "train.out_dir": str(tmp_path / "full")})
    train(full)
    halfway = _checkpoint_at(full, step=4)
    resumed = base.with_overrides(
        {
            "train.steps": 8,
            "train.out_dir": str(tmp_path / "resumed"),
            "train.init_from": halfway,
            "scaling.storage_dir": str(tmp_path / "ray-resumed"),
        }
    )
    metrics = train(resumed)
    assert metrics["step"] == 8 and metrics["samples_seen"] == 8 * base.global_batch_size
    a = load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "model.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # model.pt is the EMA: the final checkpoint's "ema", not its raw weights.
    final = load_checkpoint(_checkpoint_at(full, step=8))
    assert final["ema_updates"] == 8 and state_digest(a) == state_digest(final["ema"]) != state_digest(final["model"])


def test_init_from_a_model_built_otherwise_stops_before_any_training(run_cfg, tmp_path, monkeypatch):
    # nearest and bilinear decoders have the same weights: only the stored config tells them apart,
    # and loading one into the other would fine-tune a model that is not the one named.
    nearest = run_cfg.with_overrides({"model.upsample": "nearest"})
    weights = DFCVAE(nearest.model, nearest.data.image_size).state_dict()
    source = save_checkpoint({"model": weights, "config": nearest.to_dict(), "step": 3}, tmp_path / "nearest")
    for ours, named in (
        (run_cfg.with_overrides({"model.upsample": "bilinear"}), r"model.upsample nearest \(this run: bilinear\)"),
        (
            nearest.with_overrides({"model.latent_dim": 4}),
            rf"model.latent_dim {nearest.model.latent_dim} \(this run: 4\)",
        ),
    ):
        ours = ours.with_overrides({"train.init_from": str(source.parent)})
        started = time.monotonic()
        sentence = rf"^train.init_from {re.escape(str(source.parent))} holds a model built with {named}: "
        with pytest.raises(ConfigError, match=sentence):
            train(ours)
        assert time.monotonic() - started < 30 and not Path(ours.scaling.storage_dir).exists()
    # A training checkpoint resumes at its step: one already at train.steps would train nothing.
    done = {"model": weights, "config": nearest.to_dict(), "step": 6, "optimizer": {}, "scheduler": {}}
    save_checkpoint(done, tmp_path / "done")
    with pytest.raises(ConfigError, match=r"is a training checkpoint at step 6, and train.steps is 6: raise"):
        pin_init_from(nearest.with_overrides({"train.steps": 6, "train.init_from": str(tmp_path / "done")}))
    # The same architecture starts from those weights. A folder holding model.pt is a source too, and
    # a published model (no optimizer state) starts a new run at step 0, not at its own step. A
    # relative path reaches the workers absolute.
    shutil.copy(source, tmp_path / "nearest" / "model.pt")
    source.unlink()
    assert init_from_state(str(source.parent))["step"] == 0
    monkeypatch.chdir(tmp_path)
    assert pin_init_from(nearest.with_overrides({"train.init_from": "nearest"})) == str(source.parent.resolve())


@pytest.mark.slow
def test_init_from_a_trained_model_trains_all_its_steps_from_its_weights(ray_cluster, run_cfg, tmp_path):
    # model.pt holds its run's last step and no optimizer: resuming at that step trained nothing
    # and the stage failed on the missing checkpoint (AttributeError).
    base = run_cfg.with_overrides({"scaling.num_workers": 1, "train.steps": 2, "train.checkpoint_every": 2})
    train(base.with_overrides({"train.out_dir": str(tmp_path / "first")}))
    again = base.with_overrides(
        {
            "train.out_dir": str(tmp_path / "again"),
            "train.init_from": str(tmp_path / "first" / "model.pt"),
            "scaling.storage_dir": str(tmp_path / "ray-again"),
        }
    )
    assert train(again)["step"] == 2
    reports = [json.loads(line) for line in (tmp_path / "again" / "reports.jsonl").read_text().splitlines()]
    assert [(r["step"], r["restored_from"]) for r in reports] == [(2, 0)]
    first = load_checkpoint(tmp_path / "first" / "model.pt")["model"]
    assert state_digest(load_checkpoint(tmp_path / "again" / "model.pt")["model"]) != state_digest(first)


def test_ema_follows_the_weights_with_its_warmed_up_decay():
    """Update n (from 1) averages with decay min(0.9, (1 + n) / (10 + n)): 0.18 at the first, so a
    short run's EMA is near its weights, and 0.9 from the 80th on. Integer buffers are copied."""
    from dfcvae.step import build_ema

    cfg = Config().with_overrides(
        {"model.hidden_channels": [8, 16], "model.latent_dim": 8, "data.image_size": 32, "train.ema_decay": 0.9}
    )
    model = build_model(cfg, Runtime(torch.device("cpu")))
    ema = build_ema(cfg, model)
    name = next(n for n, _ in model.named_parameters())
    ema.update_parameters(model)  # the first update copies
    want = model.state_dict()[name].clone()
    decays = []
    for n in range(1, 101):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update_parameters(model)
        decays.append(min(0.9, (1 + n) / (10 + n)))
        want = decays[-1] * want + (1 - decays[-1]) * model.state_dict()[name]
        torch.testing.assert_close(ema.module.state_dict()[name], want)
    tracked = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    model.state_dict()[tracked[0]].fill_(7)
    ema.update_parameters(model)
    assert int(ema.module.state_dict()[tracked[0]]) == 7
    assert build_ema(cfg.with_overrides({"train.ema_decay": 0.0}), model) is None
    with pytest.raises(ConfigError, match=r"train.ema_decay 1.0 must be in \[0, 1\)"):
        build_ema(cfg.with_overrides({"train.ema_decay": 1.0}), model)


def _checkpoint_at(cfg: Config, step: int) -> str:
    """The folder of the run's checkpoint written at `step`."""
    found = [
        path.parent
        for path in Path(cfg.scaling.storage_dir).glob("train-*/checkpoint_*/checkpoint.pt")
        if load_checkpoint(path.parent)["step"] == step
    ]
    assert len(found) == 1, f"expected one checkpoint at step {step}, found {found}"
    return str(found[0])


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_to_the_final_step(ray_cluster, run_cfg):
    cfg = run_cfg.with_overrides(
        {
            "scaling.num_workers": 1,
            "scaling.max_failures": 1,
            "train.steps": 300,
            "train.checkpoint_every": 20,
            "train.log_every": 20,
            "train.val_every": 1000,
            "train.grid_every": 1000,
        }
    )
    killed: list[int] = []
    done = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(cfg, killed, done), daemon=True)
    killer.start()
    try:
        metrics = train(cfg)
    finally:
        done.set()
        killer.join()
    assert killed, "no training worker was found to kill"
    assert metrics["step"] == 300 and metrics["samples_seen"] == 300 * cfg.global_batch_size
    reports = [json.loads(line) for line in (Path(cfg.train.out_dir) / "reports.jsonl").read_text().splitlines()]
    assert any(r["restored_from"] > 0 for r in reports), "the run did not resume from a checkpoint"


def _kill_a_worker_after_first_checkpoint(cfg: Config, killed: list[int], done: threading.Event) -> None:
    # The reports log gets a line once Ray Train has taken the checkpoint in (a file in the
    # storage alone can precede that: a run restarted then would find no checkpoint).
    reports = Path(cfg.train.out_dir + ".partial") / "reports.jsonl"
    while not done.is_set():  # until training ends, however long its first checkpoint takes
        if reports.is_file() and reports.read_text().strip():
            # This cluster's workers only: its processes descend from this test process.
            # The Ray worker itself, not its DataLoader processes (forks that carry its title).
            found = [p for p in psutil.Process().children(recursive=True) if _is_train_worker(p)]
            workers = [p for p in found if p.ppid() not in {q.pid for q in found}]
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.2)


def _is_train_worker(process: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(process.cmdline())  # Ray's process title
    except psutil.Error:
        return False


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_at_once_without_a_checkpoint_or_a_retry(ray_cluster, run_cfg, capfd):
    cfg = run_cfg.with_overrides(
        {"loss.kl_weight": float("inf"), "train.checkpoint_every": 1, "scaling.max_failures": 2}
    )
    with pytest.raises(NonFiniteLossError, match="not finite at step 1|non-finite training loss at step 1"):
        train(cfg)
    assert not list(Path(cfg.scaling.storage_dir).glob("train-*/checkpoint_*/checkpoint.pt"))
    assert "restarting from the latest checkpoint" not in capfd.readouterr().out  # one attempt, not three


def test_checkpoint_with_pickle_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint({"step": 1}, tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 1


def flip_a_tensor_byte(path: Path) -> None:
    """One bit of the largest tensor's bytes in a torch checkpoint (a zip of uncompressed records)."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda m: m.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[member.header_offset + 26 : member.header_offset + 30])
    raw[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_never_used(tmp_path):
    state = {"model": DFCVAE(Config().model, 64).state_dict(), "step": 3}
    path = save_checkpoint(state, tmp_path / "a")
    assert load_checkpoint(path)["step"] == 3
    flip_a_tensor_byte(path)
    with pytest.raises(DamagedCheckpointError, match="contents differ from their digest"):
        load_checkpoint(path)
    cut = save_checkpoint(state, tmp_path / "b")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(DamagedCheckpointError, match="is damaged \\(cut short or overwritten"):
        load_checkpoint(cut)
    torch.save(state, tmp_path / "before-digests.pt")  # written before checkpoints had a digest
    assert load_checkpoint(tmp_path / "before-digests.pt")["step"] == 3


@pytest.mark.slow
def test_a_moved_checkout_finds_its_run_and_a_damaged_latest_checkpoint_is_passed_over(
    ray_cluster, run_cfg, tmp_path, monkeypatch
):
    """Paths relative to the checkout, as params.yaml gives them. The run trains in a/, the checkout
    moves to b/ (or DVC runs it in a temp workspace), and the run's latest checkpoint is damaged
    there: the rerun finds the run (not a new one from step 0), passes over the damaged step-6
    checkpoint, resumes from the intact step-3 one and ends with the same weights as before."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run_cfg.data.shards_dir, a / "data" / "shards")
    cfg = run_cfg.with_overrides(
        {
            "data.shards_dir": "data/shards",
            "scaling.storage_dir": "outputs/ray",
            "train.out_dir": "outputs/train",
            "scaling.num_workers": 1,
            "train.keep_checkpoints": 3,
        }
    )
    monkeypatch.chdir(a)
    train(cfg)  # checkpoints at steps 3 and 6
    weights = state_digest(load_checkpoint(a / "outputs/train/model.pt")["model"])
    a.rename(b)
    monkeypatch.chdir(b)
    (run,) = (b / "outputs/ray").glob("train-*")
    checkpoints = sorted(run.glob("checkpoint_*/checkpoint.pt"))
    assert [load_checkpoint(p)["step"] for p in checkpoints] == [3, 6]
    flip_a_tensor_byte(checkpoints[-1])  # as a bad disk or an interrupted copy leaves it
    assert train(cfg)["step"] == 6
    resumed = [json.loads(line) for line in (b / "outputs/train/reports.jsonl").read_text().splitlines()]
    assert {r["restored_from"] for r in resumed} == {3}, "did not resume the moved run from its intact checkpoint"
    assert state_digest(load_checkpoint(b / "outputs/train/model.pt")["model"]) == weights


def test_nonfinite_weights_are_never_checkpointed():
    from dfcvae.worker import checkpoint_payload

    cfg = Config().with_overrides({"model.hidden_channels": [8, 16], "model.latent_dim": 8, "data.image_size": 32})
    runtime = Runtime(torch.device("cpu"))
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    with torch.no_grad():
        model.decoder.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        checkpoint_payload(model, optimizer, scheduler, 1, cfg, 10)


def test_a_run_resumes_only_with_the_same_config_data_and_code(synthetic_cfg):
    from dfcvae.train import run_name

    name = run_name(synthetic_cfg, "manifest-a", "code-a")
    assert run_name(synthetic_cfg, "manifest-a", "code-a") == name  # an interrupted run finds its checkpoints
    assert run_name(synthetic_cfg, "manifest-b", "code-a") != name  # new images: train from step 0
    assert run_name(synthetic_cfg, "manifest-a", "code-b") != name  # new code
    assert run_name(synthetic_cfg.with_overrides({"train.steps": 7}), "manifest-a", "code-a") != name
    # Where the checkout lies is not what the run is: locations, MLflow and the registry stay out.
    from dfcvae.config import LOCATION_KEYS

    elsewhere = {key: f"/elsewhere/{key}" for key in LOCATION_KEYS}
    elsewhere |= {"mlflow.local_db": "/elsewhere/mlflow.db", "registry.lock_file": "/elsewhere/lock"}
    assert run_name(synthetic_cfg.with_overrides(elsewhere), "manifest-a", "code-a") == name


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device", "/data/ray"),  # a full disk: every retry repeats it
        FileNotFoundError(2, "No such file or directory", "shard.tar"),
        ValueError("a bug"),
        RuntimeError("gloo: Connection closed by peer"),  # a peer's words alone are not a loss
    ],
)
def test_only_a_lost_worker_is_retried(synthetic_cfg, monkeypatch, failure):
    """fit() with Ray Train's own failure types: a worker's exception that a retry would repeat is
    raised at once, as the worker raised it; a lost worker (its health check failed) is retried."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from dfcvae import train as driver

    lost = WorkerHealthCheckFailedError("worker 0 died", RuntimeError("actor died"))
    outcomes = [
        WorkerGroupError("failed", {0: failure}),  # raised at once
        WorkerGroupError("failed", {0: lost, 1: failure}),  # a worker lost: its peer's error follows
        "done",
    ]
    attempts = []

    class Trainer:
        def fit(self):
            attempts.append(outcomes.pop(0))
            if isinstance(attempts[-1], Exception):
                raise attempts[-1]
            return attempts[-1]

    monkeypatch.setattr(driver, "make_trainer", lambda *args, **kwargs: Trainer())
    cfg = synthetic_cfg.with_overrides({"scaling.max_failures": 3})
    with pytest.raises(type(failure)) as raised:
        driver.fit(cfg, {}, "run")
    assert raised.value is failure and len(attempts) == 1
    assert driver.fit(cfg, {}, "run") == "done" and len(attempts) == 3  # retried once, then done
