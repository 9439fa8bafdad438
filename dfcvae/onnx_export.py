"""The VAE as two ONNX graphs, checked against torch with onnxruntime before they are kept.

    encoder.onnx   images (B, 3, H, W) float32 in [-1, 1] -> mu (B, latent), logvar (B, latent)
    decoder.onnx   z (B, latent) float32 -> images (B, 3, H, W) in [-1, 1]

B is dynamic; H = W = the model's image size and latent = its latent dimension are fixed.
Each file holds its weights (no external .onnx.data). Exported with torch's dynamo exporter
(`torch.onnx.export(..., dynamo=True)`, which needs onnxscript) at opset OPSET.

The parity check (`onnx_difference`) runs both graphs in onnxruntime on CPU at batch sizes 1 and
7 and compares them with the torch model on the same inputs. TOLERANCE, relative to the largest
output magnitude, is 1e-4: float32 keeps 24 bits (eps 1.2e-7) and onnxruntime's kernels sum in
another order than torch's, which moved the outputs of the default 64 px network by at most
3.3e-7 (1.6e-7 relative) in every decoder variant; a wrong operator moves them by 1e-2 or more.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dfcvae.config import UserError
from dfcvae.model import DFCVAE

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
OPSET = 18
TOLERANCE = 1e-4
CHECKED_BATCHES = (1, 7)
EXAMPLE_BATCH = 2  # torch.export specializes a dimension whose example is 1, so the example is 2


class OnnxParityError(UserError, RuntimeError):
    """The exported graphs compute something other than the torch model."""


def export_onnx(model: DFCVAE, out: Path) -> float:
    """Write ENCODER_FILE and DECODER_FILE of `model` (eval mode is set) into the folder `out`,
    then check them: -> the relative difference `check_onnx` measured. Raises OnnxParityError
    when onnxruntime's outputs differ from torch's by more than TOLERANCE."""
    model = model.eval()
    out = Path(out)
    batch = torch.export.Dim("batch", min=1)
    device = next(model.parameters()).device
    images = torch.zeros(EXAMPLE_BATCH, 3, model.image_size, model.image_size, device=device)
    z = torch.zeros(EXAMPLE_BATCH, model.latent_dim, device=device)
    graphs = (
        (ENCODER_FILE, model.encoder, images, ["images"], ["mu", "logvar"]),
        (DECODER_FILE, model.decoder, z, ["z"], ["images"]),
    )
    for file, module, example, inputs, outputs in graphs:
        torch.onnx.export(
            module,
            (example,),
            out / file,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return check_onnx(model, out)


def onnx_difference(model: DFCVAE, folder: Path, seed: int = 0) -> float:
    """The largest |onnxruntime - torch| over every output of both graphs, divided by the largest
    |torch| output (at least 1), at each batch size in CHECKED_BATCHES; inputs: images uniform in
    [-1, 1] and z ~ N(0, I), from `seed`."""
    import onnxruntime

    model = model.eval()
    device = next(model.parameters()).device
    sessions = {
        name: onnxruntime.InferenceSession(str(Path(folder) / file), providers=["CPUExecutionProvider"])
        for name, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE))
    }
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in CHECKED_BATCHES:
        images = torch.rand(batch, 3, model.image_size, model.image_size, generator=generator) * 2 - 1
        z = torch.randn(batch, model.latent_dim, generator=generator)
        with torch.no_grad():
            expected = [*model.encode(images.to(device)), model.decode(z.to(device))]
        got = [
            *sessions["encoder"].run(None, {"images": images.numpy()}),
            *sessions["decoder"].run(None, {"z": z.numpy()}),
        ]
        for want, have in zip(expected, got, strict=True):
            want = want.float().cpu()
            scale = max(1.0, want.abs().max().item())
            worst = max(worst, (torch.from_numpy(have) - want).abs().max().item() / scale)
    return worst


def check_onnx(model: DFCVAE, folder: Path) -> float:
    """`onnx_difference`, or OnnxParityError when it exceeds TOLERANCE."""
    difference = onnx_difference(model, folder)
    if not difference <= TOLERANCE:
        raise OnnxParityError(
            f"the ONNX graphs in {folder} differ from the torch model by {difference:.2g} (relative), over "
            f"the {TOLERANCE:g} that float32 kernels keep: do not use them; report the torch and onnx versions."
        )
    return difference
