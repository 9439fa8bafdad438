"""Checkpoint storage in an S3-compatible bucket (moto's server on 127.0.0.1) that cannot be used:
one sentence before Ray starts. Training across hosts, with shards, checkpoints and MLflow
artifacts in a bucket on another host, is tests/test_hosts.py's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dfcvae.cluster import free_port
from dfcvae.config import Config
from dfcvae.train import train
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BUCKET = "dfcvae-test"
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


def storage_config(tmp: Path, shards: str, **overrides) -> Config:
    """Checkpoints in the bucket; `tmp` for the local outputs. The run never starts: the storage check fails first."""
    return tiny_config(tmp, **{"data.shards_dir": shards, "scaling.storage_dir": f"s3://{BUCKET}/ray", **overrides})


def test_checkpoint_storage_that_cannot_be_written_is_one_sentence_before_ray_starts(s3, synthetic_cfg, tmp_path):
    """A missing bucket and a dead endpoint, told apart, in seconds (moto takes any credentials)."""
    from dfcvae.cluster import StorageError

    base = storage_config(tmp_path, synthetic_cfg.data.shards_dir, **{"scaling.max_failures": 2})
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
