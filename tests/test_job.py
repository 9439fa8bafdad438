"""`ray job submit` of the train stage against a local `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from dfcvae.cluster import free_port
from dfcvae.internals import SINGLE_MACHINE_RAY
from tests.conftest import ROOT, assert_loopback_only, url_answers, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture()
def ray_head(tmp_path):
    """A head node in its own process group (`--block`), so the test can stop exactly it."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        SINGLE_MACHINE_RAY: "0",  # as README's `ray start`
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    dashboard = free_port()
    cmd = [
        "ray",
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--disable-usage-stats",
        "--port",
        str(free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(free_port()),
        "--node-ip-address",
        "127.0.0.1",
        # The job API reaches the agent on this port; its default (52365) may be another cluster's.
        "--dashboard-agent-listen-port",
        str(free_port()),
    ]
    log = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until(
            lambda: url_answers(f"{address}/api/version"),
            "the head's dashboard",
            process=head,
            log=tmp_path / "ray-head.log",
        )
        # The job server comes up after the dashboard answers; wait until it lists jobs.
        wait_until(
            lambda: (
                subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True).returncode
                == 0
            ),
            "the head's job server",
            process=head,
            log=tmp_path / "ray-head.log",
            poll_s=2,
        )
    except BaseException:
        _kill_session(head.pid)
        raise
    yield address, env, head.pid
    # The cluster is thrown away: SIGKILL every process of its session (workers put themselves
    # in process groups of their own). A graceful SIGTERM drains the node for up to 30 s.
    _kill_session(head.pid)
    head.wait()


def _kill_session(session_id: int) -> None:
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) == session_id:
                proc.kill()


def test_ray_job_submit_runs_training_steps(ray_head, synthetic_cfg, tmp_path):
    address, env, head_pid = ray_head
    # Every service of the head node (GCS, raylet, dashboard and job API, agents, workers)
    # listens on loopback only.
    assert_loopback_only(head_pid, at_least=5)
    # And it refuses commands without the cluster's token (RAY_AUTH_MODE=token).
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    out = tmp_path / "job"
    overrides = {
        "data.shards_dir": synthetic_cfg.data.shards_dir,
        "data.source": "synthetic",
        "data.image_size": 32,
        "train.out_dir": out / "train",
        "scaling.storage_dir": out / "ray",
        "mlflow.local_db": out / "mlflow.db",
        "mlflow.local_artifacts": out / "artifacts",
        "model.hidden_channels": "[8,16]",
        "model.latent_dim": 8,
        "perceptual.backbone": "mobilenet_v2",
        "eval.reference_backbone": "mobilenet_v2",
        "scaling.use_gpu": "false",
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": 0.5,
        "loader.batch_size": 8,
        "loader.num_workers": 1,
        "tune.enabled": "false",
        "train.compile": "false",
        "train.steps": 4,
        "train.checkpoint_every": 2,
        "train.val_every": 2,
        "train.val_batches": 1,
        "train.log_every": 2,
        "train.grid_every": 4,
    }
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "-m",
        "pipeline.train",
        *sets,
    ]
    result = subprocess.run(
        cmd,
        env={k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    head_log = (tmp_path / "ray-head.log").read_text()[-2000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + "\nhead:\n" + head_log
    assert "succeeded" in result.stdout + result.stderr
    assert (out / "train" / "model.pt").is_file() and (out / "train" / "metrics.json").is_file()
