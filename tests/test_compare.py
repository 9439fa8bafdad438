"""Plain VAE vs DFC-VAE: both variants through the real train stage (local Ray, MLflow on
SQLite) and the real evaluation, on tiny synthetic shards, a handful of steps each."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from dfcvae import data
from dfcvae.config import Config
from pipeline.compare import VARIANTS, compare, figure_sizes, main, plain_kl_weight

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]

STEPS = 4


@pytest.fixture(scope="module")
def compared(ray_cluster, synthetic_cfg: Config, tmp_path_factory) -> tuple[Config, dict, Path]:
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        cfg = synthetic_cfg.with_overrides(
            {
                "scaling.num_workers": 1,
                "scaling.cpus_per_worker": 0.5,
                "scaling.max_failures": 0,
                "train.steps": STEPS,
                "train.log_every": 2,
                "train.val_every": STEPS,
                "train.val_batches": 1,
                "train.checkpoint_every": STEPS,
                "train.grid_every": STEPS,
                "loader.num_workers": 1,
                "mlflow.local_artifacts": str(root / "artifacts"),
                "eval.num_samples": 8,
                "eval.batch_size": 8,
                "eval.probe_train_samples": 32,
            }
        )
        result = compare(cfg, root / "out")
        runs = {
            name: mlflow.tracking.MlflowClient().get_run(row["mlflow_run_id"])
            for name, row in result["variants"].items()
        }
    return cfg, {"result": result, "runs": runs}, root / "out"


@pytest.mark.slow
def test_both_variants_train_the_same_steps_on_the_same_shards(compared) -> None:
    cfg, found, out = compared
    rows, runs = found["result"]["variants"], found["runs"]
    assert set(rows) == set(VARIANTS)
    shards = data.manifest_hash(cfg)
    for name in VARIANTS:
        assert rows[name]["steps"] == STEPS
        assert rows[name]["manifest_hash"] == shards
        params = runs[name].data.params
        assert params["train.steps"] == str(STEPS) and params["train.seed"] == str(cfg.train.seed)
        assert params["data.shards_dir"] == str(Path(cfg.data.shards_dir).resolve())
        assert params["model.hidden_channels"] == ",".join(map(str, cfg.model.hidden_channels))
        assert runs[name].data.tags["compare.variant"] == name
        assert runs[name].info.status == "FINISHED"
    assert found["result"]["steps"] == STEPS and found["result"]["manifest_hash"] == shards


@pytest.mark.slow
def test_plain_variant_has_no_perceptual_term(compared) -> None:
    cfg, found, out = compared
    plain, dfc = found["runs"]["plain_vae"].data.params, found["runs"]["dfc_vae"].data.params
    assert float(plain["loss.perceptual_weight"]) == 0.0 and float(plain["loss.pixel_weight"]) == 1.0
    assert float(plain["loss.kl_weight"]) == pytest.approx(plain_kl_weight(cfg)) == pytest.approx(1 / (3 * 32 * 32))
    assert float(dfc["loss.perceptual_weight"]) == cfg.loss.perceptual_weight > 0
    assert float(dfc["loss.kl_weight"]) == cfg.loss.kl_weight
    logged = {}
    for name in VARIANTS:
        with (out / name / "train" / "log.csv").open() as handle:
            logged[name] = set(next(csv.reader(handle)))
    assert "train/perceptual" not in logged["plain_vae"] and "train/pixel_mse" in logged["plain_vae"]
    assert "train/perceptual" in logged["dfc_vae"]


@pytest.mark.slow
def test_fids_share_the_inception_network_and_count(compared) -> None:
    _, found, out = compared
    written = json.loads((out / "comparison.json").read_text())
    rows = written["variants"]
    assert {(rows[v]["fid_inception"], rows[v]["fid_images"]) for v in VARIANTS} == {
        (written["fid_inception"], written["fid_images"])
    }
    assert written["fid_images"] == 8 and written["fid_inception"]
    for name in VARIANTS:
        for key in ("fid_samples", "fid_recon", "psnr", "ssim", "reference_distance"):
            assert math.isfinite(rows[name][key]), (name, key)
        assert 0.0 <= rows[name]["probe_accuracy_mean"] <= 1.0
        assert Path(rows[name]["eval_dir"], "metrics.json").is_file()
    table = (out / "comparison.md").read_text()
    assert "| | plain VAE | DFC-VAE |" in table and written["fid_inception"] in table


@pytest.mark.slow
def test_side_by_side_pictures_have_the_documented_size(compared) -> None:
    _, found, out = compared
    sizes = figure_sizes(32)
    assert sizes["reconstructions.png"] == (96 + 8 * 34 + 2, 3 * 34 + 2)
    assert sizes["samples.png"] == (2 * (4 * 34 + 2) + 12, 22 + 4 * 34 + 2)
    for name, size in sizes.items():
        with Image.open(out / name) as image:
            assert image.size == size and image.mode == "RGB"
        assert tuple(found["result"]["pictures"][name]) == size


def test_missing_shards_or_params_fail_with_one_sentence(tmp_path: Path, synthetic_cfg: Config) -> None:
    with pytest.raises(SystemExit, match=r"params\.yaml not found"):
        main(["--params", str(tmp_path / "params.yaml")])
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"shards_dir": str(tmp_path / "none")}}))
    with pytest.raises(SystemExit, match=r"manifest\.json not found: make the shards first"):
        main(["--params", str(params), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
