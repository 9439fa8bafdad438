"""Export a model as a shareable bundle (dfcvae/bundle.py) that loads without MLflow.

    python -m pipeline.export --model models:/dfcvae@champion --out DIR
    python -m pipeline.export --model outputs/train/model.pt --out DIR
    python -m pipeline.export --model ... --out DIR --onnx     # adds encoder.onnx, decoder.onnx

A registered model brings its metrics, grids and provenance (version tags: data manifest hash,
git commit; the run's Inception identity). A model.pt brings the evaluate stage's metrics,
pictures and sampler from eval.out_dir when evaluation.json says they are of these weights.
--onnx adds the VAE as two ONNX graphs with a dynamic batch, checked against torch in
onnxruntime before the bundle is kept (dfcvae/onnx_export.py). Publishing DIR to a model hub
is a separate, optional step (README, "Sharing a model").
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from dfcvae import tracking
from dfcvae.bundle import write_bundle
from dfcvae.checkpoint import (
    REGISTERED_ARTIFACT,
    download_registered,
    load_checkpoint,
    load_state,
    resolve_registered,
    state_digest,
)
from dfcvae.config import Config
from dfcvae.evaluate import PICTURES
from dfcvae.sampler import SAMPLER_FILE
from dfcvae.served import SAMPLER_ARTIFACT
from pipeline.common import command, parse_config


def export(cfg: Config, source: str, out: Path, onnx: bool = False) -> Path:
    """Write the bundle of `source` (a models:/ URI, model.pt or a checkpoint) into `out`, with its
    ONNX graphs when `onnx`. A checkpoint gives its published weights (the EMA's when it has one)."""
    if source.startswith("models:/"):
        return _export_registered(cfg, source, out, onnx)
    state = load_state(source)
    eval_dir = Path(cfg.eval.out_dir)
    evaluation = _read_json(eval_dir / "evaluation.json")
    if evaluation.get("model_sha256") != state_digest(state["model"]):  # another model's evaluation
        if evaluation:
            print(f"export: {eval_dir} evaluated other weights; the bundle goes without metrics or sampler")
        return write_bundle(state, out, onnx=onnx)
    metrics = _read_json(eval_dir / "metrics.json")
    grids = {Path(name).stem: eval_dir / name for name in PICTURES if (eval_dir / name).is_file()}
    provenance = {"fid_inception": evaluation["inception"]}
    sampler = eval_dir / SAMPLER_FILE
    return write_bundle(state, out, metrics, grids, provenance, sampler if sampler.is_file() else None, onnx)


def _export_registered(cfg: Config, uri: str, out: Path, onnx: bool) -> Path:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.use_store(cfg.mlflow))
    version = resolve_registered(uri)
    run_tags = client.get_run(version.run_id).data.tags if version.run_id else {}
    provenance = {
        "name": version.name,
        "version": version.version,
        "run_id": version.run_id,
        "manifest_hash": version.tags.get("data.manifest_hash", "unknown"),
        "git_commit": version.tags.get("git_commit", "unknown"),
        "fid_inception": run_tags.get("eval.fid_inception"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = download_registered(uri, tmp)
        metrics = _read_json(path["metrics"]) if "metrics" in path else {}
        grids = {name.removeprefix("grid_"): p for name, p in path.items() if name.startswith("grid_")}
        state = load_checkpoint(path[REGISTERED_ARTIFACT])
        return write_bundle(state, out, metrics, grids, provenance, path.get(SAMPLER_ARTIFACT), onnx)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@command("export")
def main(argv: list[str] | None = None) -> None:
    def options(parser) -> None:
        parser.add_argument("--model", required=True, help="models:/<name>@<alias>, model.pt or a checkpoint")
        parser.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
        parser.add_argument("--onnx", action="store_true", help="add encoder.onnx and decoder.onnx (onnxruntime)")

    cfg, args = parse_config(__doc__.splitlines()[0], argv, options)
    out = export(cfg, args.model, args.out, args.onnx)
    print(f"export: {args.model} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


if __name__ == "__main__":
    main(sys.argv[1:])
