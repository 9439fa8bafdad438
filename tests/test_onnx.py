"""ONNX export (pipeline.export --onnx, dfcvae/onnx_export.py): the graphs onnxruntime runs compute
what the torch model computes, at any batch size, for the weights that are published."""

import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dfcvae.checkpoint import save_checkpoint
from dfcvae.config import Config
from dfcvae.model import DFCVAE
from dfcvae.onnx_export import DECODER_FILE, ENCODER_FILE, TOLERANCE, OnnxParityError, check_onnx

SMALL = {"model.hidden_channels": [8, 16], "model.latent_dim": 8, "data.image_size": 32}


def _weights(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """A VAE's state_dict with its BatchNorm statistics drawn too, so eval mode is not the identity."""
    torch.manual_seed(seed)
    model = DFCVAE(cfg.model, cfg.data.image_size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def _torch_model(cfg: Config, weights: dict[str, torch.Tensor]) -> DFCVAE:
    model = DFCVAE(cfg.model, cfg.data.image_size)
    model.load_state_dict(weights)
    return model.eval()


def _relative_error(have: np.ndarray, want: torch.Tensor) -> float:
    return (torch.from_numpy(have) - want).abs().max().item() / max(1.0, want.abs().max().item())


@pytest.mark.parametrize(("upsample", "ema"), [("bilinear", True), ("nearest", False), ("transposed", False)])
def test_onnx_graphs_compute_what_the_published_model_does_at_batch_1_and_7(tmp_path, upsample, ema):
    from pipeline.export import export

    head = {"model.full_res_convs": 0} if upsample == "transposed" else {}  # it has no full-resolution stages
    cfg = Config().with_overrides({**SMALL, "model.upsample": upsample, **head, "eval.out_dir": str(tmp_path / "eval")})
    state = {"model": _weights(cfg, 0), "config": cfg.to_dict(), "step": 3, "samples_seen": 12}
    if ema:  # a training checkpoint: its published weights are the EMA's
        state |= {"ema": _weights(cfg, 1), "ema_updates": 3}
    save_checkpoint(state, tmp_path / "checkpoint")

    out = export(cfg, str(tmp_path / "checkpoint"), tmp_path / "bundle", onnx=True)

    published = _torch_model(cfg, state["ema"] if ema else state["model"])
    encoder = ort.InferenceSession(str(out / ENCODER_FILE), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(out / DECODER_FILE), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(5)
    for batch in (1, 7):
        images = torch.rand(batch, 3, 32, 32, generator=generator) * 2 - 1
        z = torch.randn(batch, 8, generator=generator) * 2
        mu, logvar = encoder.run(None, {"images": images.numpy()})
        (decoded,) = decoder.run(None, {"z": z.numpy()})
        assert mu.shape == logvar.shape == (batch, 8) and decoded.shape == (batch, 3, 32, 32)
        want_mu, want_logvar = published.encode(images)
        with torch.no_grad():
            want_decoded = published.decode(z)
        for have, want in ((mu, want_mu), (logvar, want_logvar), (decoded, want_decoded)):
            assert _relative_error(have, want.detach()) <= TOLERANCE
        if ema:  # the raw weights are not what was exported
            raw_mu, _ = _torch_model(cfg, state["model"]).encode(images)
            assert _relative_error(mu, raw_mu.detach()) > 100 * TOLERANCE

    card = (out / "README.md").read_text()
    assert re.search(r"largest difference \S+ of the largest output \(tolerance 0\.0001\)", card)
    code = re.search(r"## ONNX.*?```python\n(.*?)```", card, re.S).group(1)  # the card's own example runs
    scope: dict = {}
    exec(code.replace("<this folder>", str(out)), scope)
    assert scope["x_hat"].shape == (4, 3, 32, 32)


def test_graphs_of_other_weights_fail_the_parity_check(tmp_path):
    from dfcvae.onnx_export import export_onnx

    cfg = Config().with_overrides(SMALL)
    assert export_onnx(_torch_model(cfg, _weights(cfg, 0)), tmp_path) <= TOLERANCE
    with pytest.raises(OnnxParityError, match=r"differ from the torch model by .* over the 0\.0001"):
        check_onnx(_torch_model(cfg, _weights(cfg, 1)), tmp_path)
