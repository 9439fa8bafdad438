"""The committed recipe on a tiny model: no posterior collapse, no checkerboard (docs/quality.md)."""

from pathlib import Path

import pytest
import torch

from dfcvae.config import Config
from dfcvae.device import Runtime
from dfcvae.metrics import active_units, nyquist_power
from dfcvae.step import train_in_process
from dfcvae.worker import collapse_warning, fixed_val_batches

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150


@pytest.mark.slow
def test_default_recipe_keeps_its_posterior_and_adds_no_checkerboard(synthetic_cfg, one_thread):
    """params.yaml's loss balance and decoder (alpha, beta, pixel weight, feature_norm; MobileNetV2
    ImageNet features) on the tiny model: at least half the latent dimensions stay active, and the
    reconstructions have no more period-2 power than the real images. The old transposed decoder,
    trained the same way, fails the second check: the measure sees a checkerboard."""
    committed = Config.load(ROOT / "params.yaml")
    assert synthetic_cfg.loss == committed.loss and synthetic_cfg.model.upsample == committed.model.upsample
    cfg = synthetic_cfg.with_overrides({"train.val_batches": 4, "train.steps": STEPS})
    runtime = Runtime(torch.device("cpu"))
    x = torch.cat(fixed_val_batches(cfg, runtime))  # (32, 3, 32, 32) val images
    measured = {}
    for upsample in (committed.model.upsample, "transposed"):
        model = train_in_process(cfg.with_overrides({"model.upsample": upsample}), STEPS, runtime)
        with torch.no_grad():
            mu = model.encode(x)[0]
            recon = model.decode(mu)
        ratio = float(nyquist_power(recon).mean() / nyquist_power(x).mean())
        measured[upsample] = (active_units(mu) / model.latent_dim, ratio)
    active, ratio = measured[committed.model.upsample]
    assert active >= 0.5, measured
    assert ratio <= 1.0, measured
    assert measured["transposed"][1] > 1.0, measured


def test_collapse_warning_only_after_warmup_and_under_the_threshold():
    cfg = Config().with_overrides({"loss.kl_warmup_steps": 100, "train.warn_active_fraction": 0.25})
    assert collapse_warning(cfg, 50, 0.0) is None  # still warming up
    assert collapse_warning(cfg, 100, 0.25) is None
    message = collapse_warning(cfg, 100, 0.125)
    assert message.count("\n") == 4 and "POSTERIOR COLLAPSE at step 100: 12% " in message
    assert "loss.kl_weight" in message and "train.warn_active_fraction 25%" in message
