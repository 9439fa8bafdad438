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

from dfcvae.config import Config
from dfcvae.shards.format import manifest_hash
from pipeline.compare import VARIANTS, compare, figure_sizes, main, mean_interval, plain_kl_weight, verdict

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]

STEPS = 4
SEEDS = 2


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
        result = compare(cfg, root / "out", seeds=SEEDS)
        runs = {
            name: [mlflow.tracking.MlflowClient().get_run(row["mlflow_run_id"]) for row in rows]
            for name, rows in result["runs"].items()
        }
    return cfg, {"result": result, "runs": runs}, root / "out"


@pytest.mark.slow
def test_both_variants_train_the_same_steps_on_the_same_shards_at_each_seed(compared) -> None:
    cfg, found, out = compared
    rows, runs = found["result"]["runs"], found["runs"]
    assert set(rows) == set(VARIANTS)
    shards = manifest_hash(cfg)
    seeds = [cfg.train.seed + k for k in range(SEEDS)]
    for name in VARIANTS:
        assert [row["seed"] for row in rows[name]] == seeds
        for seed, row, run in zip(seeds, rows[name], runs[name], strict=True):
            assert row["steps"] == STEPS and row["manifest_hash"] == shards
            params = run.data.params
            assert params["train.steps"] == str(STEPS) and params["train.seed"] == str(seed)
            assert params["data.shards_dir"] == str(Path(cfg.data.shards_dir).resolve())
            assert params["model.hidden_channels"] == ",".join(map(str, cfg.model.hidden_channels))
            assert run.data.tags["compare.variant"] == name and run.data.tags["compare.seed"] == str(seed)
            assert run.info.status == "FINISHED"
            assert Path(row["eval_dir"]) == out / name / f"seed{seed}" / "eval"
    assert found["result"]["steps"] == STEPS and found["result"]["manifest_hash"] == shards


@pytest.mark.slow
def test_plain_variant_has_no_perceptual_term(compared) -> None:
    cfg, found, out = compared
    plain, dfc = found["runs"]["plain_vae"][0].data.params, found["runs"]["dfc_vae"][0].data.params
    assert float(plain["loss.perceptual_weight"]) == 0.0 and float(plain["loss.pixel_weight"]) == 1.0
    assert float(plain["loss.kl_weight"]) == pytest.approx(plain_kl_weight(cfg)) == pytest.approx(1 / (3 * 32 * 32))
    assert float(dfc["loss.perceptual_weight"]) == cfg.loss.perceptual_weight > 0
    assert float(dfc["loss.kl_weight"]) == cfg.loss.kl_weight
    logged = {}
    for name in VARIANTS:
        with (out / name / f"seed{cfg.train.seed}" / "train" / "log.csv").open() as handle:
            logged[name] = set(next(csv.reader(handle)))
    assert "train/perceptual" not in logged["plain_vae"] and "train/pixel_mse" in logged["plain_vae"]
    assert "train/perceptual" in logged["dfc_vae"]


@pytest.mark.slow
def test_each_metric_has_its_mean_over_seeds_an_interval_and_a_verdict(compared) -> None:
    cfg, found, out = compared
    written = json.loads((out / "comparison.json").read_text())
    rows, runs, verdicts = written["variants"], written["runs"], written["verdicts"]
    assert {(row["fid_inception"], row["fid_images"]) for v in VARIANTS for row in runs[v]} == {
        (written["fid_inception"], written["fid_images"])
    }
    assert written["fid_images"] == 8 and written["fid_inception"]
    for name in VARIANTS:
        for key in ("fid_samples", "fid_recon", "kid_samples", "kid_recon", "psnr", "ssim", "reference_distance"):
            values = [row[key] for row in runs[name]]
            assert all(math.isfinite(v) for v in values), (name, key)
            assert rows[name][key] == pytest.approx(sum(values) / SEEDS)
            low, high = rows[name][f"{key}_interval"]
            assert low <= rows[name][key] <= high
        assert 0.0 <= rows[name]["probe_accuracy_mean"] <= 1.0
    for key, found_verdict in verdicts.items():
        differences = [d[key] - p[key] for p, d in zip(runs["plain_vae"], runs["dfc_vae"], strict=True)]
        assert found_verdict["difference"] == pytest.approx(sum(differences) / SEEDS)
        assert found_verdict["verdict"] == verdict(found_verdict["interval"])
    table = (out / "comparison.md").read_text()
    assert "| | plain VAE | DFC-VAE | verdict |" in table and written["fid_inception"] in table
    assert f"seeds {', '.join(str(row['seed']) for row in runs['dfc_vae'])}" in table
    decoder, shift = cfg.model.upsample, cfg.loss.feature_shift  # the recipe, in both variants
    assert f"| model.upsample | {decoder} | {decoder} | |" in table
    assert f"| loss.feature_shift | {shift} | {shift} | |" in table


def test_verdicts_need_the_paired_interval_to_exclude_zero() -> None:
    mean, interval = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and interval == pytest.approx([2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5])
    assert verdict(mean_interval([-3.0, -2.9, -3.2])[1]) == "DFC-VAE lower with 95% confidence"
    assert verdict(mean_interval([3.0, 2.9, 3.2])[1]) == "DFC-VAE higher with 95% confidence"
    assert verdict(mean_interval([-3.0, 1.0, -2.0])[1]) == "no difference shown"
    assert mean_interval([5.0]) == (5.0, None) and verdict(None) == "no difference shown"


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
