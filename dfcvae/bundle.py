"""A shareable model bundle: a folder that rebuilds the VAE without MLflow, Ray or pickle.

    model.safetensors   the VAE's state_dict (safetensors: tensors and a JSON header, no code)
    config.json         the full config it was trained with (`Config.to_dict()`)
    README.md           the model card: data, metrics and how they were measured, loss, backbone
    <grid>.png          the evaluation's pictures (samples, reconstructions, ...), when given
    sampler.safetensors the evaluation's prior sampler (dfcvae/sampler.py), when given
    encoder.onnx        images -> (mu, logvar), and decoder.onnx, z -> images, when asked for
                        (dfcvae/onnx_export.py: dynamic batch, checked against torch)

`load_bundle(folder)` -> (DFCVAE in eval mode, Config) needs only torch, safetensors and this
package. `pipeline.export` writes a bundle from a registered model or a model.pt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dfcvae.checkpoint import model_from_state
from dfcvae.config import Config
from dfcvae.files import staging_dir, swap_in, write_json
from dfcvae.model import DFCVAE
from dfcvae.onnx_export import DECODER_FILE, ENCODER_FILE, TOLERANCE, export_onnx
from dfcvae.sampler import SAMPLER_FILE, Sampler, load_sampler

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
# The card's metrics, in order: key -> what it is.
CARD_METRICS = {
    "test/fid_samples": "FID of prior samples (eval.sampler) against the test images",
    "test/fid_samples_normal": "FID of samples z ~ N(0, T^2 I) (eval.temperature)",
    "test/fid_samples_gmm": "FID of samples from the Gaussian mixture on train latents",
    "test/fid_recon": "FID of reconstructions decode(mu) against the test images",
    "test/fid_samples_literature": "FID of 10,000 prior samples against 10,000 test images (Ghosh et al. 2020)",
    "test/fid_recon_literature": "FID of reconstructions under that protocol",
    "test/kid_samples": "KID of prior samples (Bińkowski et al. 2018), unbiased at any image count",
    "test/kid_recon": "KID of reconstructions",
    "test/psnr": "PSNR of reconstructions, dB",
    "test/ssim": "SSIM of reconstructions",
    "test/lpips": "LPIPS v0.1 of reconstructions (ImageNet backbone)",
    "test/reference_distance": "fixed-layer perceptual distance (eval.reference_*)",
    "test/active_fraction": "share of active latent dimensions (Burda et al. 2016)",
    "test/nyquist_ratio": "checkerboard measure, reconstructions / real (> 1: a checkerboard)",
    "test/lattice_ratio": "lattice measure, reconstructions / real, worst period (> 1: a lattice)",
    "test/probe_accuracy_mean": "linear attribute probe on latent means, mean accuracy",
}


def write_bundle(
    state: dict[str, Any],
    out: Path,
    metrics: dict[str, Any] | None = None,
    grids: dict[str, Path] | None = None,
    provenance: dict[str, Any] | None = None,
    sampler: Path | None = None,
    onnx: bool = False,
) -> Path:
    """A checkpoint ({"model", "config", ...}) as a bundle folder `out`, replaced whole: written
    beside it and swapped in when complete, so an earlier bundle's files never mix with this one's
    and an interruption leaves the earlier bundle. UserError when `out` holds files that are not a
    bundle's (files.staging_dir).

    metrics: the evaluation's metrics.json; grids: picture name -> PNG; provenance: where the
    model comes from (registered name and version, data manifest hash, run id, git commit);
    sampler: the evaluation's sampler.safetensors; onnx: add ENCODER_FILE and DECODER_FILE, or
    OnnxParityError (and the earlier bundle kept) when they do not compute what the model does.
    """
    target = Path(out)
    out = staging_dir(target, (CONFIG_FILE, WEIGHTS_FILE))
    try:
        _write_files(state, out, metrics, grids, provenance, sampler, onnx)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    swap_in(out, target)
    return target


def _write_files(state, out: Path, metrics, grids, provenance, sampler, onnx: bool) -> None:
    cfg = Config.from_stored(state["config"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt", "step": str(state.get("step", ""))})
    write_json(cfg.to_dict(), out / CONFIG_FILE)
    pictures = {}
    for name, path in (grids or {}).items():
        pictures[name] = f"{name}.png"
        shutil.copyfile(path, out / pictures[name])
    if sampler is not None:
        shutil.copyfile(sampler, out / SAMPLER_FILE)
    onnx_difference = export_onnx(model_from_state(state, "cpu")[0], out) if onnx else None
    card = model_card(cfg, state, metrics or {}, pictures, provenance or {}, onnx_difference)
    (out / CARD_FILE).write_text(card)


def load_bundle(folder: str | Path, device: torch.device | str = "cpu") -> tuple[DFCVAE, Config]:
    """The VAE of a bundle folder, in eval mode on `device`, and its config. FileNotFoundError
    when the folder lacks a bundle's files."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a dfcvae bundle: {', '.join(missing)} missing.")
    state = {"model": load_file(folder / WEIGHTS_FILE), "config": json.loads((folder / CONFIG_FILE).read_text())}
    return model_from_state(state, device)


def load_bundle_sampler(folder: str | Path) -> Sampler | None:
    """The bundle's prior sampler, or None when it has none (then sample z ~ N(0, I))."""
    path = Path(folder) / SAMPLER_FILE
    return load_sampler(path) if path.is_file() else None


def _interval(metrics: dict[str, Any], key: str) -> str:
    """The card's interval cell: [low, high] from metrics.json's <key>_ci, ± the spread for KID, else -."""
    if isinstance(metrics.get(f"{key}_ci"), list):
        low, high = metrics[f"{key}_ci"]
        return f"[{low:.4g}, {high:.4g}]"
    if isinstance(metrics.get(f"{key}_std"), (int, float)):
        return f"± {metrics[f'{key}_std']:.2g}"
    return "-"


def model_card(
    cfg: Config,
    state: dict[str, Any],
    metrics: dict[str, Any],
    pictures: dict[str, str],
    provenance: dict[str, Any],
    onnx_difference: float | None = None,
) -> str:
    """The bundle's README.md: what the model is, what it was trained on, how well it does, and
    how to run its ONNX graphs when it has them (onnx_difference: their measured parity)."""
    m, loss, p = cfg.model, cfg.loss, cfg.perceptual
    lines = [
        f"# DFC-VAE: {provenance.get('name', 'dfcvae')}"
        + (f" version {provenance['version']}" if "version" in provenance else ""),
        "",
        "A Deep Feature Consistent VAE (Hou et al., WACV 2017, arXiv 1610.00291) trained with dfcvae.",
        "",
        "```python",
        "from dfcvae.bundle import load_bundle, load_bundle_sampler",
        'model, cfg = load_bundle("<this folder>")  # images in [-1, 1], (B, 3, H, W)',
        "x_hat = model.reconstruct(x); z, _ = model.encode(x); samples = model.sample(16)",
        "# the evaluation's sampler, when the bundle has one: model.decode(sampler.sample(16, generator))",
        'sampler = load_bundle_sampler("<this folder>")',
        "```",
        "",
        "## Model",
        "",
        f"- {cfg.data.image_size} px RGB, latent dimension {m.latent_dim}, hidden channels "
        f"{list(m.hidden_channels)}, decoder upsampling `{m.upsample}`"
        f"{f' with {m.full_res_convs} full-resolution conv stages' if m.full_res_convs else ''}, "
        f"encoder kernel {m.encoder_kernel}",
        f"- trained {state.get('step', '?')} steps; weights `{WEIGHTS_FILE}`, config `{CONFIG_FILE}`",
        "",
        "## Loss",
        "",
        f"- alpha (KL weight) {loss.kl_weight:g}, beta (feature weight) {loss.perceptual_weight:g}, "
        f"pixel weight {loss.pixel_weight:g}, feature norm `{loss.feature_norm}`",
        f"- features: `{p.backbone}` ({p.weights}) layers {list(p.layers)}",
        "",
        "## Data",
        "",
        f"- source `{cfg.data.source}`"
        + (" (procedurally drawn faces, not CelebA: demo data)" if cfg.data.source == "synthetic" else ""),
        f"- shards manifest sha256 `{provenance.get('manifest_hash', 'unknown')}`",
    ]
    for key in ("run_id", "git_commit"):
        if key in provenance:
            lines.append(f"- {key.replace('_', ' ')} `{provenance[key]}`")
    lines += ["", "## Metrics", ""]
    shown = [(key, what) for key, what in CARD_METRICS.items() if key in metrics]
    if shown:
        level = metrics.get("confidence")
        lines += [
            f"| metric | value | {f'{level:.0%} interval' if level else 'interval'} | what |",
            "| --- | ---: | ---: | --- |",
        ]
        lines += [
            f"| `{key}` | {float(metrics[key]):.4g} | {_interval(metrics, key)} | {what} |" for key, what in shown
        ]
        count, network = metrics.get("test/fid_images"), provenance.get("fid_inception")
        protocol = metrics.get("fid_protocol") or {}
        lines += [
            "",
            f"FID protocol: {int(count) if count else '?'} test images against as many prior samples "
            f"(seed {cfg.eval.seed}, sampler `{protocol.get('sampler', cfg.eval.sampler)}`) or reconstructions, "
            f"Inception `{network or protocol.get('inception', 'see the evaluation')}`, "
            f"resize {protocol.get('resize', 'see the evaluation')}; FIDs compare only under one protocol. "
            "Intervals: bootstrap over the test images and samples (dfcvae/uncertainty.py); KID: the value, "
            "then its standard deviation over subsets.",
        ]
    else:
        lines.append("Not evaluated: this bundle came from a checkpoint without evaluation metrics.")
    if onnx_difference is not None:
        size, latent = cfg.data.image_size, cfg.model.latent_dim
        lines += [
            "",
            "## ONNX",
            "",
            f"`{ENCODER_FILE}` maps images (B, 3, {size}, {size}) in [-1, 1] to `mu`, `logvar` (B, {latent}); "
            f"`{DECODER_FILE}` maps `z` (B, {latent}) to images. B is free; float32 throughout.",
            "",
            "```python",
            "import numpy as np, onnxruntime as ort",
            f'encoder = ort.InferenceSession("<this folder>/{ENCODER_FILE}")',
            f'decoder = ort.InferenceSession("<this folder>/{DECODER_FILE}")',
            f"x = np.zeros((4, 3, {size}, {size}), np.float32)  # your images, scaled to [-1, 1]",
            'mu, logvar = encoder.run(None, {"images": x})',
            '(x_hat,) = decoder.run(None, {"z": mu})  # reconstructions; z ~ N(0, I) gives samples',
            "```",
            "",
            f"Checked against torch in onnxruntime on CPU at batch sizes 1 and 7: largest difference "
            f"{onnx_difference:.2g} of the largest output (tolerance {TOLERANCE:g}).",
        ]
    if pictures:
        lines += ["", "## Pictures", ""] + [f"![{name}]({file})" for name, file in pictures.items()]
    return "\n".join(lines) + "\n"
