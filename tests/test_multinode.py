"""Scale-out on one machine: a Ray cluster of a head and two worker nodes on 127.0.0.1, shards,
checkpoints and MLflow artifacts in an S3-compatible bucket (moto's server on 127.0.0.1), and a
node lost mid-run. Credentials reach every process through the environment, as on a cluster.

Each worker node offers one `trainer_slot` and each training worker needs one, so the two
workers run on different nodes, and a run that lost a node needs a replacement to go on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dfcvae.checkpoint import load_checkpoint
from dfcvae.cluster import free_port
from dfcvae.config import Config, ConfigError
from dfcvae.internals import SINGLE_MACHINE_RAY
from dfcvae.train import ClusterError, train
from tests.conftest import tiny_config, url_answers, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BUCKET = "dfcvae-test"
SLOT = "trainer_slot"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "dfcvae-test", "AWS_SECRET_ACCESS_KEY": "dfcvae-test"}


@pytest.fixture(scope="module")
def s3() -> str:
    """An S3-compatible store on 127.0.0.1 with an empty bucket; its endpoint in the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(name, value)
        env.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


def bucket_keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def cluster(s3):
    """A head (no CPUs: it runs the driver's controller) and two worker nodes, all on 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv(SINGLE_MACHINE_RAY, "0")  # every node binds 127.0.0.1
        env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            nodes.add_node(num_cpus=1, resources={SLOT: 1})
        env.setenv("RAY_ADDRESS", nodes.address)
        ray.init(address=nodes.address)
        nodes.wait_for_nodes()
        yield nodes
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def tracking_server(s3, tmp_path_factory):
    """An MLflow server on 127.0.0.1 whose artifacts go to the bucket (--artifacts-destination)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_until(lambda: url_answers(f"{uri}/health"), f"{uri}/health", process=server, log=root / "server.log")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def shards_in_bucket(synthetic_cfg, s3) -> str:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(synthetic_cfg.data.shards_dir) + "/", f"{BUCKET}/shards/", recursive=True)
    return f"s3://{BUCKET}/shards"


def cluster_config(tmp: Path, shards: str, **overrides) -> Config:
    """Two workers, one per node, shards and checkpoints in the bucket; `tmp` for the local outputs."""
    return tiny_config(
        tmp,
        **{
            "data.shards_dir": shards,
            "scaling.num_workers": 2,
            "scaling.cpus_per_worker": 0.5,
            "scaling.worker_resources": {SLOT: 1},
            "scaling.placement_strategy": "SPREAD",
            "scaling.storage_dir": f"s3://{BUCKET}/ray",
            "scaling.node_wait_s": 60,
            "scaling.max_failures": 2,
            "train.steps": 24,
            "train.log_every": 4,
            "train.val_every": 24,
            "train.val_batches": 1,
            "train.checkpoint_every": 4,
            "train.grid_every": 24,
            "optim.lr": 2e-3,
            **overrides,
        },
    )


def reports(cfg: Config) -> list[dict]:
    """The run's reports: in `<train.out_dir>.partial/` while it trains, in train.out_dir after."""
    for folder in (Path(cfg.train.out_dir + ".partial"), Path(cfg.train.out_dir)):
        if (folder / "reports.jsonl").is_file():
            return [json.loads(line) for line in (folder / "reports.jsonl").read_text().splitlines()]
    return []


@pytest.fixture(scope="module")
def uninterrupted(cluster, tracking_server, shards_in_bucket, tmp_path_factory) -> Config:
    cfg = cluster_config(tmp_path_factory.mktemp("whole"), shards_in_bucket)
    train(cfg)
    return cfg


def test_two_nodes_train_from_and_into_the_bucket_with_ranks_in_step(uninterrupted, cluster):
    import mlflow

    cfg = uninterrupted
    rows = reports(cfg)
    last = [r for r in rows if r["step"] == cfg.train.steps]
    assert sorted(r["rank"] for r in last) == [0, 1]
    assert len({r["node_id"] for r in last}) == 2, "the two ranks ran on one node"
    worker_nodes = {n.node_id for n in cluster.list_all_nodes() if not n.head}
    assert {r["node_id"] for r in last} <= worker_nodes
    assert len({r["weights_sha256"] for r in last}) == 1, "the ranks' VAE weights differ"
    assert all(r["restored_from"] == 0 for r in rows)
    assert any(key.endswith("checkpoint.pt") for key in bucket_keys("ray/")), "no checkpoint in the bucket"
    run_id = json.loads((Path(cfg.train.out_dir) / "run.json").read_text())["run_id"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"metrics.json", "log.csv"} <= artifacts
    stored = bucket_keys("mlflow/")
    assert any(key.endswith(f"{run_id}/artifacts/metrics.json") for key in stored), stored[:20]


def test_a_node_lost_mid_run_is_replaced_and_the_run_ends_as_if_uninterrupted(
    uninterrupted, cluster, shards_in_bucket, tmp_path
):
    # The same run as `uninterrupted` (same data, settings and code) in its own storage: in the
    # same storage it would find that run's checkpoints and end at once, as it should.
    cfg = cluster_config(tmp_path, shards_in_bucket, **{"scaling.storage_dir": f"s3://{BUCKET}/ray-lost"})
    outcome: dict[str, object] = {}

    def run() -> None:  # the driver in a thread: Ray's node management wants the main one
        try:
            outcome["metrics"] = train(cfg)
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the test's thread
            outcome["error"] = err

    driver = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    driver.start()
    lost: dict[str, object] = {}
    while driver.is_alive() and "node" not in lost:
        rows = [r for r in reports(cfg) if r["rank"] == 0 and 8 <= r["step"] < cfg.train.steps]
        if rows:
            victim = next(n for n in cluster.list_all_nodes() if n.node_id == rows[-1]["node_id"])
            lost["node"], lost["after_step"] = victim.node_id, rows[-1]["step"]
            cluster.remove_node(victim)  # its raylet and its workers, rank 0 among them
            time.sleep(2)
            cluster.add_node(num_cpus=1, resources={SLOT: 1})  # as an autoscaler would
        time.sleep(0.1)
    driver.join(timeout=600)
    if "error" in outcome:
        raise outcome["error"]
    metrics = outcome["metrics"]
    assert "node" in lost, "the run ended before a node could be lost"
    print(f"node {str(lost['node'])[:8]} lost after step {lost['after_step']}; resumed from", end=" ")
    rows = reports(cfg)
    resumed = [r for r in rows if r["restored_from"] > 0]
    assert resumed, "no rank resumed from a checkpoint"
    print(sorted({r["restored_from"] for r in resumed}), f"in {time.monotonic() - started:.0f} s")
    assert all(lost["after_step"] - cfg.train.checkpoint_every <= r["restored_from"] for r in resumed)
    last = [r for r in rows if r["step"] == cfg.train.steps]
    assert sorted(r["rank"] for r in last) == [0, 1] and len({r["node_id"] for r in last}) == 2
    assert lost["node"] not in {r["node_id"] for r in last}
    assert metrics["step"] == cfg.train.steps
    assert metrics["samples_seen"] == cfg.train.steps * cfg.global_batch_size
    whole = load_checkpoint(Path(uninterrupted.train.out_dir) / "model.pt")["model"]
    resumed_model = load_checkpoint(Path(cfg.train.out_dir) / "model.pt")["model"]
    for key, value in whole.items():
        assert torch.allclose(value.float(), resumed_model[key].float(), atol=1e-6), key


def test_without_a_replacement_node_the_run_fails_in_one_sentence(cluster, shards_in_bucket, tracking_server, tmp_path):
    cfg = cluster_config(tmp_path, shards_in_bucket, **{"scaling.num_workers": 3, "scaling.node_wait_s": 5})
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"no nodes for 3 workers .* scaling.node_wait_s=5 s"):
        train(cfg)
    assert time.monotonic() - start < 120


def test_a_local_storage_path_on_several_nodes_is_refused(cluster, shards_in_bucket, tracking_server, tmp_path):
    cfg = cluster_config(tmp_path, shards_in_bucket, **{"scaling.storage_dir": str(tmp_path / "ray")})
    with pytest.raises(ConfigError, match="does not survive that node"):
        train(cfg)
    assert not (tmp_path / "ray").exists()


def test_checkpoint_storage_that_cannot_be_written_is_one_sentence_before_ray_starts(s3, synthetic_cfg, tmp_path):
    """A missing bucket and a dead endpoint, told apart, in seconds (moto takes any credentials)."""
    from dfcvae.cluster import StorageError

    base = cluster_config(tmp_path, synthetic_cfg.data.shards_dir, **{"scaling.max_failures": 2})
    missing = base.with_overrides({"scaling.storage_dir": "s3://no-such-bucket/ray"})
    cases = [
        ({}, missing, r"the bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+: create it"),
        ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, base, r"the object store at .* does not answer"),
    ]
    for env, cfg, says in cases:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            started = time.monotonic()
            with pytest.raises(StorageError, match=says) as err:
                train(cfg)
            assert "\n" not in str(err.value) and time.monotonic() - started < 30
    assert not Path(base.train.out_dir).exists()
