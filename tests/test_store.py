"""The project's MLflow store as users reach it: commands that find it as the stages do, and a
registered model that is gone (its champion version deleted, mlflow/mlflow#8459)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from dfcvae.checkpoint import RegistryError, init_from_state, pin_init_from
from dfcvae.registry import CHAMPION
from dfcvae.train import train
from pipeline import export as export_stage
from pipeline import sample as sample_stage
from tests.conftest import ROOT
from tests.test_registry import cfg, register, write_outputs  # noqa: F401 - cfg is a fixture

MISSING = r"models:/dfcvae@champion: the alias 'champion' is not set on 'dfcvae' .* the versions that exist are 2"


@pytest.fixture
def champion_deleted(cfg):  # noqa: F811 - the fixture imported above
    write_outputs(cfg, seed=1, objective=5.0)
    assert register(cfg).version == 1
    write_outputs(cfg, seed=2, objective=9.0)
    assert register(cfg).version == 2  # worse: a challenger
    MlflowClient().delete_model_version(cfg.registry.model_name, "1")  # the champion, by hand
    return cfg


def test_a_deleted_champion_is_one_sentence_naming_what_exists(champion_deleted, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(champion_deleted.to_dict()))
    for main, extra in (
        (sample_stage.main, ["--params", str(params), "--out", str(tmp_path / "s.png")]),
        (export_stage.main, ["--params", str(params), "--out", str(tmp_path / "bundle")]),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["--model", "models:/dfcvae@champion", *extra])
        message = str(stopped.value.code)
        assert message.count("\n") == 0, message
        assert "(challenger)" in message, message
        assert re.search(MISSING, message), message
    assert not (tmp_path / "bundle").exists()


def test_init_from_a_missing_alias_fails_once_before_any_training(champion_deleted, synthetic_cfg, tmp_path):
    resumed = champion_deleted.with_overrides(
        {
            "data.shards_dir": synthetic_cfg.data.shards_dir,
            "train.init_from": "models:/dfcvae@champion",
            "scaling.max_failures": 2,
        }
    )
    started = time.monotonic()
    with pytest.raises(RegistryError, match=MISSING):
        train(resumed)
    assert time.monotonic() - started < 30  # no Ray workers started, nothing retried
    assert not Path(resumed.scaling.storage_dir).exists()


def test_init_from_an_alias_is_pinned_to_the_version_it_names_for_the_workers(cfg):  # noqa: F811
    """Every worker and retry loads the version checked before Ray starts, not one moved there since,
    and a registered model's weights start a new run at step 0."""
    write_outputs(cfg, seed=1, objective=5.0)
    assert register(cfg).version == 1
    name = cfg.registry.model_name
    pinned = pin_init_from(cfg.with_overrides({"train.init_from": f"models:/{name}@{CHAMPION}"}))
    assert pinned == f"models:/{name}/1"
    checked = init_from_state(pinned)
    assert checked["step"] == 0
    # The alias moves to another model before a worker (or a retry) loads the source.
    write_outputs(cfg, seed=2, objective=9.0)
    assert register(cfg).version == 2
    MlflowClient().set_registered_model_alias(name, CHAMPION, "2")
    moved = init_from_state(f"models:/{name}@{CHAMPION}")["model"]
    loaded = init_from_state(pinned)["model"]
    first = next(k for k in loaded if loaded[k].is_floating_point())
    assert not torch.equal(moved[first], checked["model"][first])  # the alias now names other weights
    assert all(torch.equal(loaded[k], checked["model"][k]) for k in checked["model"])  # the pinned source does not


@pytest.mark.slow
def test_the_readmes_commands_find_the_projects_store_without_a_variable(cfg, tmp_path):  # noqa: F811
    """`python -m pipeline.sample --model models:/dfcvae@champion` from the project's folder: the
    store of params.yaml, as the stages find it, and no stray ./mlflow.db."""
    write_outputs(cfg, seed=1, objective=5.0)
    register(cfg)
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "pipeline.sample", "--model", f"models:/dfcvae@{CHAMPION}", "--out", "s.png"]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (project / "s.png").is_file()
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml", "s.png"]  # no mlflow.db, no mlruns/
    # Without a store there, one sentence, and still nothing created.
    (project / "params.yaml").write_text(yaml.safe_dump(cfg.with_overrides({"mlflow.local_db": "none/db"}).to_dict()))
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"sample: no MLflow store at {project / 'none' / 'db'} (mlflow.local_db): run the pipeline first "
        "(make demo, or dvc repro) from the project's folder, or set MLFLOW_TRACKING_URI to the store that "
        "holds the model."
    ]
    assert not (project / "none").exists()
