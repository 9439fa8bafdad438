"""The MLflow registry: champion gating, concurrent registrations, the pyfunc, serving.

MLflow runs on SQLite in tmp_path (MLFLOW_TRACKING_URI); the "trained" models are tiny
seeded VAEs and the evaluation outputs are written here, so nothing trains or evaluates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from dfcvae import tracking
from dfcvae.checkpoint import load_checkpoint, load_registered, model_from_state, state_digest
from dfcvae.cluster import free_port
from dfcvae.config import Config
from dfcvae.model import DFCVAE
from dfcvae.registry import (
    CHALLENGER,
    CHAMPION,
    RegistrationError,
    register_model,
)
from dfcvae.sampler import SAMPLER_FILE, GaussianMixtureSampler, save_sampler
from dfcvae.shards.format import write_manifest
from dfcvae.uncertainty import SCORES_FILE, Scores, objective_value
from pipeline import register as register_stage
from tests.conftest import assert_loopback_only, tiny_config, url_answers, wait_until

ROOT = Path(__file__).resolve().parents[1]
# Written by the code before model.upsample existed (tests/data/README.md): a registered model's
# files as MLflow downloads them, and what that model predicted then.
LEGACY_MODEL = ROOT / "tests" / "data" / "legacy_registered_model.tar.gz"
LEGACY_PREDICTIONS = ROOT / "tests" / "data" / "legacy_predictions.pt"
GRIDS = ("samples", "reconstructions", "interpolations", "attribute_arithmetic")


@pytest.fixture
def cfg(tmp_path, monkeypatch) -> Config:
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # An earlier test's mlflow.set_tracking_uri would otherwise win over the variable.
    mlflow.set_tracking_uri(uri)
    return tiny_config(tmp_path)


def fake_scores(objective: float, seed: int, n: int = 200, d: int = 16) -> Scores:
    """Scores whose fid_sum is `objective` plus a little: the test images' features are fixed, the
    samples are those features permuted and shifted by half the objective (the FID of a shifted
    copy is the squared shift), the reconstructions shifted by the other half plus seeded noise."""
    real = np.random.default_rng(0).normal(size=(n, d))
    rng = np.random.default_rng(seed)
    shift = np.full(d, math.sqrt(abs(objective) / 2 / d)) if math.isfinite(objective) else np.zeros(d)
    recon = real + shift + 0.01 * rng.normal(size=(n, d))
    samples = real[rng.permutation(n)] + shift
    return Scores({"psnr": 20 - objective / 10 + rng.normal(size=n)}, real, recon, samples)


def write_outputs(
    cfg: Config,
    seed: int,
    objective: float,
    run_status: str = "FINISHED",
    active_fraction: float | None = 1.0,
    scores: Scores | None = None,
) -> str:
    """What the train and evaluate stages leave behind, at cfg's paths; returns the run id.
    metrics.json's objective is the scores' (`fake_scores(objective, seed)` unless given), or
    `objective` itself when it is not finite."""
    train_dir, eval_dir = Path(cfg.train.out_dir), Path(cfg.eval.out_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = DFCVAE(cfg.model, cfg.data.image_size)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 7}, train_dir / "model.pt")
    stored = Scores.load((scores or fake_scores(objective, seed)).save(eval_dir / SCORES_FILE))
    value = objective_value(cfg.eval.objective, *stored.fids()) if math.isfinite(objective) else objective
    metrics = {
        cfg.eval.objective: value,
        "test/fid_samples": 1.0,
        "test/fid_samples_ci": [0.5, 1.5],
        "confidence": 0.95,
    }
    if active_fraction is not None:
        metrics["test/active_fraction"] = active_fraction
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    for i, name in enumerate(GRIDS):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(eval_dir / f"{name}.png")
    uri = tracking.setup(cfg.mlflow)
    run_id = tracking.start_run(cfg, "train", {}, data="training")  # as the train stage starts its run
    tracking.RunLogger(uri, run_id).finish(run_status)
    (train_dir / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return run_id


def register(cfg: Config):
    return register_model(
        cfg,
        Path(cfg.train.out_dir) / "model.pt",
        Path(cfg.eval.out_dir) / "metrics.json",
        Path(cfg.eval.out_dir),
        run_id=json.loads((Path(cfg.train.out_dir) / "run.json").read_text())["run_id"],
    )


def aliases(cfg: Config) -> dict[str, int]:
    return {k: int(v) for k, v in MlflowClient().get_registered_model(cfg.registry.model_name).aliases.items()}


def registered(cfg: Config, seed: int, objective: float) -> tuple[Path, str]:
    """One registered champion and a copy of its weights; returns (model.pt copy, model name)."""
    write_outputs(cfg, seed, objective)
    assert register(cfg).decision == "promoted"
    weights = Path(cfg.train.out_dir).parent / "champion.pt"
    weights.write_bytes((Path(cfg.train.out_dir) / "model.pt").read_bytes())
    return weights, cfg.registry.model_name


@pytest.mark.slow
def test_champion_moves_only_for_a_clearly_better_objective(cfg, tmp_path):
    manifest = Path(cfg.data.shards_dir) / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"source": "synthetic"}')
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    record = Path(cfg.registry.out_dir) / "registration.json"
    client = MlflowClient()
    name = cfg.registry.model_name

    write_outputs(cfg, seed=1, objective=10.0)
    register_stage.main(["--params", str(params)])
    first = json.loads(record.read_text())
    assert (first["version"], first["decision"], first["champion_objective"]) == (1, "promoted", None)
    assert aliases(cfg) == {CHAMPION: 1, CHALLENGER: 1}

    write_outputs(cfg, seed=2, objective=12.5)  # worse
    register_stage.main(["--params", str(params)])
    worse = json.loads(record.read_text())
    assert worse["decision"] == "kept" and worse["challenger_objective"] == pytest.approx(12.5, rel=0.05)
    assert worse["champion_objective"] == pytest.approx(10.0, rel=0.05) and worse["difference"] > 0.15
    assert aliases(cfg) == {CHAMPION: 1, CHALLENGER: 2}
    assert client.get_model_version(name, "2").description == worse["reason"]
    assert f"{worse['challenger_objective']:.4g} vs champion v1's {worse['champion_objective']:.4g}" in worse["reason"]

    write_outputs(cfg, seed=3, objective=9.8)  # 2% lower: within the noise the gate allows for
    register_stage.main(["--params", str(params)])
    slightly = json.loads(record.read_text())
    assert slightly["decision"] == "kept" and slightly["difference"] < 0
    assert slightly["difference_interval"][1] > -cfg.registry.min_improvement
    minimum = f"{cfg.registry.min_improvement:.0%}"
    assert f"promotion needs fid_sum lower by more than {minimum} at 95% confidence" in slightly["reason"]

    write_outputs(cfg, seed=4, objective=8.0)  # 20% lower
    register_stage.main(["--params", str(params)])
    better = json.loads(record.read_text())
    assert better["decision"] == "promoted" and better["previous_champion_version"] == 1
    assert aliases(cfg) == {CHAMPION: 4, CHALLENGER: 4}
    low, high = better["difference_interval"]
    assert low <= better["difference"] <= high < -cfg.registry.min_improvement
    assert (better["min_confidence"], better["min_improvement"]) == (0.95, cfg.registry.min_improvement)
    assert better["per_image"][0]["name"] == "psnr" and better["per_image"][0]["relative"] > 0
    version = client.get_model_version(name, "4")
    assert version.description == better["reason"] and f"lower by more than {minimum}" in better["reason"]
    assert json.loads(version.tags["objective_difference_interval"]) == better["difference_interval"]
    assert version.tags["champion_compared"] == "1"
    assert version.tags["data.manifest_hash"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert version.tags["git_commit"] and version.tags["objective"] == cfg.eval.objective
    downloaded = mlflow.artifacts.download_artifacts(f"models:/{name}/4", dst_path=str(tmp_path / "dl"))
    attached = {p.name for p in Path(downloaded).rglob("*")}
    assert {f"{g}.png" for g in GRIDS} | {"metrics.json", "config.json", "model.pt", SCORES_FILE} <= attached


def champion_of_older_shards(synthetic_cfg: Config, cfg: Config, tmp_path: Path) -> tuple[Config, Scores]:
    """Champion v1 registered on the synthetic shards; then new shards (another order seed: a new
    manifest hash, as new images give), a new evaluation. -> (the new config, v1's scores on it:
    what the gate will measure when it evaluates v1 again)."""
    from dfcvae.registry import scores_on
    from dfcvae.sharding import write_shards

    old = cfg.with_overrides(
        {
            "data.inventory_dir": synthetic_cfg.data.inventory_dir,
            "data.shards_dir": synthetic_cfg.data.shards_dir,
            "eval.num_samples": 8,
            "eval.probe_train_samples": 16,
        }
    )
    write_outputs(old, seed=1, objective=10.0)
    assert register(old).decision == "promoted"
    new = old.with_overrides({"data.shards_dir": str(tmp_path / "new-shards"), "data.seed": 1})
    write_shards(new)
    return new, scores_on(new, f"models:/{new.registry.model_name}/1")


@pytest.mark.slow
def test_when_the_data_changes_the_champion_is_evaluated_again_like_the_challenger(synthetic_cfg, cfg, tmp_path):
    new, champion = champion_of_older_shards(synthetic_cfg, cfg, tmp_path)
    # A challenger scored on the new evaluation that reconstructs nothing of the images: worse.
    worse_scores = Scores(champion.per_image, champion.real, champion.real[::-1] * 3, champion.samples * 3)
    write_outputs(new, seed=2, objective=0.0, scores=worse_scores)
    worse = register(new)
    version = MlflowClient().get_model_version(new.registry.model_name, "2")
    again = float(version.tags["champion_objective_value"])
    assert worse.decision == "kept" and worse.champion_scored_again and worse.champion_objective == again
    assert again == pytest.approx(objective_value(new.eval.objective, *champion.fids()))
    assert "the champion was evaluated again like v2: evaluated on another evaluation" in worse.reason
    # One that reconstructs perfectly and samples real images: clearly better, compared on the same numbers.
    better_scores = Scores(champion.per_image, champion.real, champion.real, champion.real[::-1])
    write_outputs(new, seed=3, objective=0.0, scores=better_scores)
    better = register(new)
    assert better.decision == "promoted" and better.champion_objective == pytest.approx(again)
    assert aliases(new) == {CHAMPION: 3, CHALLENGER: 3}
    write_outputs(new, seed=4, objective=0.0, scores=worse_scores)  # evaluated like champion v3: its stored scores
    same = register(new)
    assert same.decision == "kept" and not same.champion_scored_again and "evaluated again" not in same.reason


def test_a_collapsed_model_is_never_promoted_and_the_record_says_why(cfg):
    write_outputs(cfg, seed=1, objective=10.0, active_fraction=0.0)  # the first version: no champion yet
    first = register(cfg)
    assert first.decision == "kept" and "posterior collapse" in first.reason and "0.0%" in first.reason
    assert CHAMPION not in aliases(cfg)
    write_outputs(cfg, seed=2, objective=20.0, active_fraction=0.75)
    assert register(cfg).decision == "promoted"
    floor = cfg.registry.min_active_fraction
    write_outputs(cfg, seed=3, objective=1.0, active_fraction=floor / 2)  # far better FID, collapsed
    collapsed = register(cfg)
    assert collapsed.decision == "kept" and collapsed.champion_version == 2
    assert f"registry.min_active_fraction {floor:.1%}" in collapsed.reason
    version = MlflowClient().get_model_version(cfg.registry.model_name, str(collapsed.version))
    assert version.description == collapsed.reason and version.tags["decision"] == "kept"
    write_outputs(cfg, seed=4, objective=1.0, active_fraction=None)  # evaluated before the measure existed
    assert "cannot be ruled out" in register(cfg).reason
    assert aliases(cfg)[CHAMPION] == 2


CONCURRENT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from dfcvae.config import Config
    from dfcvae.registry import register_model
    cfg = Config.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    ready, go = Path(sys.argv[2]), Path(sys.argv[3])
    ready.touch()
    while not go.exists():  # start both registrations together, after the slow imports
        time.sleep(0.01)
    out = Path(cfg.train.out_dir)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    metrics = Path(cfg.eval.out_dir) / "metrics.json"
    result = register_model(cfg, out / "model.pt", metrics, cfg.eval.out_dir, run_id=run_id)
    print(json.dumps({"version": result.version, "decision": result.decision, "lock_held_s": result.lock_held_s,
                      "scored_again": result.champion_scored_again}))
""")


FIRST_USE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dfcvae import tracking
    from dfcvae.config import MlflowConfig
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    tracking.setup(MlflowConfig(experiment="first-use", local_db=sys.argv[3], local_artifacts=sys.argv[4]))
    print("ok")
""")


def test_a_dvc_temp_workspace_tracks_into_the_users_store(tmp_path, monkeypatch):
    """`dvc exp run --temp` runs the stages in a copy it deletes; DVC_ROOT names the user's repository."""
    from dfcvae.train import absolute_paths

    user, temp = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp123"
    temp.mkdir(parents=True)
    monkeypatch.chdir(temp)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(user))
    cfg = Config.load(ROOT / "params.yaml")
    assert tracking.tracking_uri(cfg.mlflow) == f"sqlite:///{user / 'outputs/mlflow/mlflow.db'}"
    assert absolute_paths(cfg).mlflow.local_artifacts == str(user / "outputs/mlflow/artifacts")
    assert absolute_paths(cfg).train.out_dir == str(temp / "outputs/train")  # outputs stay the workspace's
    monkeypatch.delenv("DVC_ROOT")
    assert tracking.tracking_uri(cfg.mlflow) == f"sqlite:///{temp / 'outputs/mlflow/mlflow.db'}"


@pytest.mark.slow
def test_four_processes_can_start_tracking_on_a_new_sqlite_store_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    db, artifacts, go = tmp_path / "new" / "mlflow.db", tmp_path / "artifacts", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE, str(tmp_path / f"ready{i}"), str(go), str(db), str(artifacts)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for i, proc in enumerate(procs):
        wait_until((tmp_path / f"ready{i}").exists, f"process {i} at the start line", process=proc, poll_s=0.05)
    go.touch()
    results = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-600:] for _, err in results]
    assert MlflowClient(f"sqlite:///{db}").get_experiment_by_name("first-use") is not None


def register_together(configs: dict[str, Config], tmp_path: Path) -> dict[str, dict]:
    """Each config's registration in its own process, all let go at one instant; -> their results."""
    procs, go = {}, tmp_path / "go"
    for key, sub in configs.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(sub.to_dict()))
        procs[key] = subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(tmp_path / f"{key}.json"), str(tmp_path / f"{key}.ready"), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
    for key, proc in procs.items():
        wait_until(
            (tmp_path / f"{key}.ready").exists, f"registration {key} at the start line", process=proc, poll_s=0.05
        )
    go.touch()
    results = {}
    for key, proc in procs.items():
        out, _ = proc.communicate()
        assert proc.returncode == 0
        results[key] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.slow
def test_concurrent_registrations_get_distinct_versions_and_a_consistent_champion(cfg, tmp_path):
    write_outputs(cfg, seed=1, objective=10.0)
    register(cfg)
    objectives = {"a": 5.0, "b": 7.0}  # both beat v1; only 5.0 may end up champion
    configs = {}
    for key, objective in objectives.items():
        sub = cfg.with_overrides({"train.out_dir": str(tmp_path / key / "train"), "eval.out_dir": str(tmp_path / key)})
        write_outputs(sub, seed=ord(key), objective=objective)
        configs[key] = sub
    results = register_together(configs, tmp_path)

    versions = {key: r["version"] for key, r in results.items()}
    assert sorted(versions.values()) == [2, 3]
    assert aliases(cfg) == {CHAMPION: versions["a"], CHALLENGER: 3}
    # Serialised decisions: "a" always wins; "b" wins only if it went first (and then loses the champion to "a").
    assert results["a"]["decision"] == "promoted"
    assert results["b"]["decision"] == ("promoted" if versions["b"] < versions["a"] else "kept")


@pytest.mark.slow
def test_the_champion_is_scored_again_outside_the_lock_while_another_registers(synthetic_cfg, cfg, tmp_path):
    """Both challengers were evaluated on new shards, so the champion must be evaluated again (a full
    evaluation, seconds); that happens before the lock, which each holds for well under a second."""
    new, champion = champion_of_older_shards(synthetic_cfg, cfg, tmp_path)
    perfect = Scores(champion.per_image, champion.real, champion.real, champion.real[::-1])
    close = Scores(champion.per_image, champion.real, champion.real * 1.02, champion.real[::-1] * 1.02)
    configs = {}
    for key, scores in (("a", perfect), ("b", close)):  # both far better than v1; "a" better than "b"
        sub = new.with_overrides({"train.out_dir": str(tmp_path / key / "train"), "eval.out_dir": str(tmp_path / key)})
        write_outputs(sub, seed=ord(key), objective=0.0, scores=scores)
        configs[key] = sub
    results = register_together(configs, tmp_path)

    assert all(r["lock_held_s"] < 2.0 for r in results.values()), results
    assert any(r["scored_again"] for r in results.values()), results  # at least the first scored v1 again
    versions = {key: r["version"] for key, r in results.items()}
    assert sorted(versions.values()) == [2, 3] and results["a"]["decision"] == "promoted"
    assert aliases(new) == {CHAMPION: versions["a"], CHALLENGER: 3}


FRESH = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    BLOCKED = ("dfcvae.features", "dfcvae.loss", "dfcvae.train", "dfcvae.shards")

    class NoTrainingCode(importlib.abc.MetaPathFinder):
        # The served model must not need the perceptual network, the loss or the data stack.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchvision" or name in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, NoTrainingCode())
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import dfcvae.model  # already imported by the load: from the model's code folder
    x = np.load(sys.argv[2])
    np.savez(
        sys.argv[3],
        recon=model.predict(x),
        mu=model.predict(x, params={"mode": "encode"}),
        samples=model.predict(x[:1], params={"mode": "sample", "n": 5, "seed": 3}),
    )
    print(json.dumps({"model_file": dfcvae.model.__file__}))
""")


@pytest.mark.slow
def test_champion_loads_in_a_fresh_process_and_matches_training_code(cfg, tmp_path):
    weights, name = registered(cfg, seed=5, objective=3.0)
    state = load_checkpoint(weights)
    model = DFCVAE(Config.from_stored(state["config"]).model, cfg.data.image_size)
    model.load_state_dict(state["model"])
    model.eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # the example has 2
    np.save(tmp_path / "x.npy", x.numpy())

    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty_torch_home")}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, f"models:/{name}@{CHAMPION}", str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not json.loads(proc.stdout.strip().splitlines()[-1])["model_file"].startswith(str(ROOT))  # the shipped copy

    out = np.load(tmp_path / "out.npz")
    assert out["recon"].shape == (3, 3, 32, 32)
    np.testing.assert_allclose(out["recon"], model.reconstruct(x).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["mu"], model.encode(x)[0].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(out["samples"], model.sample(5, torch.Generator().manual_seed(3)).numpy(), atol=1e-5)
    for key, value in load_registered(f"models:/{name}@{CHAMPION}")["model"].items():
        assert torch.equal(value, state["model"][key])


def start_server(command: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # MLflow execs `uvicorn` by name: it must be this interpreter's, venv activated or not.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )


def wait_until_answering(server: subprocess.Popen, url: str, log: Path) -> None:
    wait_until(lambda: url_answers(url), url, process=server, log=log)


def gmm_sampler(cfg: Config) -> GaussianMixtureSampler:
    """A mixture fit on made-up latents, written where the evaluate stage writes its sampler."""
    latents = torch.randn(200, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1)) * 0.5 + 2.0
    sampler = GaussianMixtureSampler.fit(latents, 3, seed=0)
    save_sampler(sampler, Path(cfg.eval.out_dir) / SAMPLER_FILE)
    return sampler


@pytest.mark.slow
def test_served_champion_answers_with_reconstructions(cfg, tmp_path):
    """Also: the Gaussian mixture stored with the model is the one its sample mode draws from."""
    write_outputs(cfg, seed=6, objective=3.0)
    sampler = gmm_sampler(cfg)
    assert register(cfg).decision == "promoted"
    name = cfg.registry.model_name
    local, _ = model_from_state(load_checkpoint(Path(cfg.train.out_dir) / "model.pt"), "cpu")
    with torch.no_grad():
        expected_gmm = gmm = local.decode(sampler.sample(4, torch.Generator().manual_seed(5))).numpy()
    port, log = free_port(), tmp_path / "serve.log"
    server = start_server(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{name}@{CHAMPION}",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        log,
        tmp_path,
    )
    try:
        wait_until_answering(server, f"http://127.0.0.1:{port}/ping", log)
        assert_loopback_only(server.pid)
        x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
        for body, shape in (
            ({"inputs": x.tolist()}, (3, 3, 32, 32)),
            ({"inputs": x[:1].tolist(), "params": {"mode": "sample", "n": 4}}, (4, 3, 32, 32)),
            ({"inputs": x[:1].tolist(), "params": {"mode": "sample", "n": 4, "seed": 5}}, expected_gmm),
            ({"inputs": x[:1].tolist(), "params": {"mode": "sample", "n": 4, "seed": 5, "sampler": "gmm"}}, gmm),
        ):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                predictions = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
            if isinstance(shape, np.ndarray):  # the stored mixture's draws, decoded as locally
                np.testing.assert_allclose(predictions, shape, atol=1e-5)
                continue
            assert predictions.shape == shape and np.abs(predictions).max() <= 1
        # 8-bit pixels where [-1, 1] is expected: refused in a sentence, not reconstructed as noise.
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": (x * 127.5 + 127.5).tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert "not [-1, 1] (8-bit pixels? send x / 127.5 - 1)" in json.loads(refused.value.read())["message"]
        # Out of bounds (serve.max_batch = 64): a 400 and a sentence, never a stack trace.
        for params, inputs, says in (
            ({"mode": "sample", "n": 400}, x[:1], "params.n=400: ask for 1 to 64 samples (serve.max_batch)"),
            ({"mode": "sample", "n": -1}, x[:1], "params.n=-1: ask for 1 to 64"),
            ({"mode": "sample", "n": 0}, x[:1], "params.n=0: ask for 1 to 64"),
            ({"mode": "sample", "n": 1e9}, x[:1], "'n'"),  # MLflow's own check: n is an integer
            ({}, np.zeros((65, 3, 32, 32)), "send 1 to 64 images per request (serve.max_batch), not 65"),
            ({}, x[:, :, :16], "got shape (3, 3, 16, 32)"),
        ):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps({"inputs": inputs.tolist(), "params": params}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            body = refused.value.read().decode()
            assert refused.value.code == 400 and says in json.loads(body)["message"], body[-500:]
            assert "stack_trace" not in json.loads(body) and "Traceback" not in body
    finally:
        stop(server)


def test_the_python_api_takes_what_users_pass_and_refuses_the_rest_in_the_http_paths_words(cfg):
    """mlflow.pyfunc.load_model(...).predict(x) with numpy's float64, lists, torch tensors; and
    8-bit pixels, wrong shapes, frames, strings: each refused in one sentence, no array dumped."""
    write_outputs(cfg, seed=3, objective=3.0)
    register(cfg)
    served = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@{CHAMPION}")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32))  # float64, numpy's default
    expected = served.predict(x.astype(np.float32))
    for accepted in (x, x.tolist(), torch.as_tensor(x), torch.as_tensor(x, dtype=torch.float32)):
        np.testing.assert_allclose(served.predict(accepted), expected, atol=1e-6)
    import pandas as pd

    eight_bit = (x * 127.5 + 127.5).astype(np.uint8)
    for refused, says in (
        (eight_bit, "got uint8 pixels (8-bit? send x / 127.5 - 1)"),
        (eight_bit.astype(np.float64), "not [-1, 1] (8-bit pixels? send x / 127.5 - 1)"),
        (x[0], "got shape (3, 32, 32)"),
        (x[:, :1], "got shape (2, 1, 32, 32)"),
        (pd.DataFrame({"pixel": [0.1, 0.2]}), "got shape (2, 1)"),
        ("an image", "got str"),
        ([[0.1, 0.2], [0.3]], "ragged"),
        (np.full((1, 3, 32, 32), np.nan), "NaN or infinite"),
    ):
        with pytest.raises(mlflow.exceptions.MlflowException) as err:
            served.predict(refused)
        assert "expected images of shape (B, 3, 32, 32)" in err.value.message or says in err.value.message
        assert says in err.value.message and len(err.value.message) < 200, err.value.message


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it forks workers), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_the_mlflow_ui_command_listens_on_loopback_only(cfg, tmp_path):
    """The UI command the demo prints serves the local store to this machine only."""
    write_outputs(cfg, seed=7, objective=2.0)  # a store with a run in it
    port, log = free_port(), tmp_path / "ui.log"
    command = tracking.ui_command(cfg.mlflow, port)
    server = start_server([sys.executable, "-m", *command], log, tmp_path)
    try:
        wait_until_answering(server, f"http://127.0.0.1:{port}/health", log)
        assert_loopback_only(server.pid)
    finally:
        stop(server)


def test_a_registered_version_leads_to_the_data_that_trained_it_and_the_data_that_scored_it(
    synthetic_cfg, cfg, tmp_path
):
    """MLflow 3 lineage, read back through MlflowClient alone: the version's run has the training
    shards as its input, and its logged model's test metrics are linked to the shards that scored
    them. Here the model is scored on a newer shard set than it trained on, so the two differ."""
    trained = cfg.with_overrides({"data.shards_dir": synthetic_cfg.data.shards_dir})
    write_outputs(trained, seed=1, objective=4.0)
    newer = tmp_path / "newer_shards"
    shutil.copytree(synthetic_cfg.data.shards_dir, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["splits"]["test"]["count"] -= 1  # another manifest: another hash
    write_manifest(newer, manifest)
    scored = trained.with_overrides({"data.shards_dir": str(newer)})
    result = register(scored)

    client = MlflowClient()
    version = client.get_model_version(cfg.registry.model_name, str(result.version))
    hashes = {
        name: (Path(c.data.shards_dir) / "manifest.sha256").read_text().split()[0]
        for name, c in (("trained", trained), ("scored", scored))
    }
    assert hashes["trained"] != hashes["scored"]
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
        for i in client.get_run(version.run_id).inputs.dataset_inputs
    }
    assert (
        {context: d.digest for context, d in inputs.items()}
        == {
            "training": hashes["trained"][:36],  # MLflow keeps 36 characters of a digest
            "evaluation": hashes["scored"][:36],
        }
    )
    profile = json.loads(inputs["evaluation"].profile)
    assert profile == {
        "manifest_sha256": hashes["scored"],
        "splits": {k: v["count"] for k, v in manifest["splits"].items()},
    }
    # The version's source is its logged model (MLflow's SQL registry leaves ModelVersion.model_id empty).
    assert version.source.startswith("models:/m-")
    linked = client.get_logged_model(version.source.removeprefix("models:/")).metrics
    assert {m.key for m in linked} >= {"test/fid_samples", "test/active_fraction"}
    assert {(m.dataset_name, m.dataset_digest) for m in linked} == {("synthetic shards", hashes["scored"][:36])}


def test_without_a_training_run_the_model_goes_on_a_new_finished_run(cfg):
    write_outputs(cfg, seed=1, objective=4.0)
    out = Path(cfg.train.out_dir)
    result = register_model(cfg, out / "model.pt", Path(cfg.eval.out_dir) / "metrics.json", cfg.eval.out_dir)
    run = MlflowClient().get_run(result.run_id)
    assert result.run_id != json.loads((out / "run.json").read_text())["run_id"]
    assert (run.info.run_name, run.info.status, result.decision) == ("register", "FINISHED", "promoted")


def test_an_evaluation_without_per_image_scores_is_refused_with_one_sentence(cfg):
    write_outputs(cfg, seed=1, objective=4.0)
    (Path(cfg.eval.out_dir) / SCORES_FILE).unlink()  # an evaluate stage older than scores.npz
    with pytest.raises(FileNotFoundError, match="scores.npz not found: re-run the evaluate stage"):
        register(cfg)
    assert MlflowClient().search_registered_models() == []


def test_failed_runs_and_non_finite_metrics_are_refused(cfg):
    write_outputs(cfg, seed=1, objective=float("nan"))
    with pytest.raises(RegistrationError, match="non-finite metrics"):
        register(cfg)
    write_outputs(cfg, seed=1, objective=2.0, run_status="FAILED")
    with pytest.raises(RegistrationError, match="is FAILED, not FINISHED"):
        register(cfg)
    assert MlflowClient().search_registered_models() == []


# The stored predictions were computed on another CPU. float32 convolutions and matmuls sum in an
# order that depends on the CPU's kernels (AVX2, AVX-512, oneDNN's blocking), so another machine
# rounds differently: measured, up to 7.5e-9 absolute on these outputs of magnitude <= 1. The
# tolerance is 1,000x that and still 10,000x under what a changed network does (the halved
# decoder of the next test moves the outputs by ~0.1, the wrong decoder fails to load at all).
ANY_CPU = {"rtol": 1e-4, "atol": 1e-5}


def test_models_saved_before_the_decoder_option_load_as_transposed_and_predict_the_same(tmp_path):
    with tarfile.open(LEGACY_MODEL) as tar:
        tar.extractall(tmp_path, filter="data")
    expected = torch.load(LEGACY_PREDICTIONS, weights_only=True)
    x = expected["x"]
    state = load_checkpoint(tmp_path / "model" / "artifacts" / "model.pt")
    assert "upsample" not in state["config"]["model"]
    model, cfg = model_from_state(state, "cpu")
    assert (cfg.model.upsample, cfg.model.encoder_kernel, cfg.model.init) == ("transposed", 3, "default")
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), expected["reconstruct"], **ANY_CPU)
        torch.testing.assert_close(model.encode(x)[0], expected["encode"], **ANY_CPU)
        torch.testing.assert_close(model.sample(4, torch.Generator().manual_seed(0)), expected["sample"], **ANY_CPU)
        # The check can fail: the same weights in the paper's decoder do not predict the same.
        paper = {**state, "config": {**state["config"], "model": {**state["config"]["model"], "upsample": "nearest"}}}
        with contextlib.suppress(RuntimeError):  # or do not load at all
            changed, _ = model_from_state(paper, "cpu")
            assert not torch.allclose(changed.reconstruct(x), expected["reconstruct"], **ANY_CPU)
    served = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    np.testing.assert_allclose(served.predict(x.numpy()), expected["reconstruct"].numpy(), **ANY_CPU)
    np.testing.assert_allclose(
        served.predict(x.numpy(), params={"mode": "encode"}), expected["encode"].numpy(), **ANY_CPU
    )


def test_two_versions_loaded_in_one_process_each_run_their_own_code(cfg, tmp_path, monkeypatch):
    """v2 is registered with a dfcvae package whose decoder output is halved: loaded beside v1 (in
    either order), each version's predictions come from its own bundled network code."""
    import shutil

    from dfcvae import served

    write_outputs(cfg, seed=1, objective=10.0)
    assert register(cfg).version == 1
    changed = tmp_path / "changed" / "dfcvae"
    shutil.copytree(served.BUNDLED_PACKAGE, changed, ignore=shutil.ignore_patterns("__pycache__"))
    model_py = changed / "model.py"
    text = model_py.read_text()
    assert "        return self.decoder(z)\n" in text
    model_py.write_text(text.replace("        return self.decoder(z)\n", "        return 0.5 * self.decoder(z)\n"))
    monkeypatch.setattr(served, "BUNDLED_PACKAGE", changed)
    write_outputs(cfg, seed=1, objective=20.0)  # the same weights
    assert register(cfg).version == 2
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    name = cfg.registry.model_name
    for order in ((1, 2), (2, 1)):
        loaded = {v: mlflow.pyfunc.load_model(f"models:/{name}/{v}") for v in order}
        one, two = loaded[1].predict(x), loaded[2].predict(x)
        # Halving is exact in float32, and the untrained decoder's outputs are small (DCGAN init
        # through two full-resolution stages: about 2e-4), so the tolerance is relative only.
        np.testing.assert_allclose(two, 0.5 * one, rtol=1e-5, atol=0)
        assert np.abs(one).max() > 1e-6  # not all zeros: the halving is visible


# ---------------------------------------------------------------- the shareable bundle

NO_MLFLOW = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    sys.modules["mlflow"] = None  # importing MLflow anywhere below fails
    from dfcvae.bundle import load_bundle
    model, cfg = load_bundle(sys.argv[1])
    x = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        np.save(sys.argv[3], model.reconstruct(x).numpy())
    loaded = sys.modules.get("mlflow") is not None
    print(json.dumps({"latent_dim": cfg.model.latent_dim, "mlflow": loaded}))
""")


@pytest.mark.slow
def test_exported_bundle_holds_no_pickle_and_predicts_as_the_registered_model_without_mlflow(cfg, tmp_path):
    from dfcvae.bundle import load_bundle_sampler
    from pipeline.export import export

    write_outputs(cfg, seed=5, objective=3.0)
    sampler = gmm_sampler(cfg)
    assert register(cfg).decision == "promoted"
    name = cfg.registry.model_name
    out = export(cfg, f"models:/{name}@champion", tmp_path / "bundle")
    draw = torch.Generator().manual_seed(7)
    assert torch.equal(load_bundle_sampler(out).sample(5, draw), sampler.sample(5, torch.Generator().manual_seed(7)))
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= set(files)
    assert {f"{grid}.png" for grid in GRIDS} <= set(files)
    for file, data in files.items():  # pickle protocol 2+ starts with 0x80, torch.save's zip with PK
        assert not data.startswith((b"\x80", b"PK")) and Path(file).suffix not in {".pt", ".pth", ".pkl"}, file
    header = int.from_bytes(files["model.safetensors"][:8], "little")  # safetensors: a JSON header first
    assert "decoder.head" in "".join(json.loads(files["model.safetensors"][8 : 8 + header]))
    card = files["README.md"].decode()
    version = MlflowClient().get_model_version_by_alias(name, "champion")
    assert version.tags["data.manifest_hash"] in card and f"version {version.version}" in card
    assert "FID protocol" in card and "![samples](samples.png)" in card
    assert "| metric | value | 95% interval | what |" in card and "| `test/fid_samples` | 1 | [0.5, 1.5] |" in card

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.save(tmp_path / "x.npy", x.numpy())
    script = tmp_path / "load.py"
    script.write_text(NO_MLFLOW)
    done = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"latent_dim": cfg.model.latent_dim, "mlflow": False}
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(x.numpy())
    assert np.array_equal(np.load(tmp_path / "y.npy"), served)


def test_export_of_a_model_pt_takes_the_evaluation_beside_it(cfg, tmp_path):
    from dfcvae.bundle import load_bundle
    from pipeline.export import export

    write_outputs(cfg, seed=2, objective=4.0)
    trained = load_checkpoint(Path(cfg.train.out_dir) / "model.pt")["model"]
    evaluation = Path(cfg.eval.out_dir) / "evaluation.json"
    evaluation.write_text(json.dumps({"model_sha256": "of other weights", "inception": "i"}))
    out = export(cfg, str(Path(cfg.train.out_dir) / "model.pt"), tmp_path / "other")
    assert "Not evaluated" in (out / "README.md").read_text() and not list(out.glob("*.png"))
    evaluation.write_text(json.dumps({"model_sha256": state_digest(trained), "inception": "i"}))
    out = export(cfg, str(Path(cfg.train.out_dir) / "model.pt"), tmp_path / "bundle")
    model, loaded = load_bundle(out)
    assert loaded == Config.from_stored(cfg.to_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items())
    assert "`test/fid_samples` | 1 |" in (out / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="is not a dfcvae bundle"):
        load_bundle(tmp_path)
