"""Stage `register`: the trained, evaluated model into the MLflow registry, champion gated.

Inputs: train.out_dir/model.pt and run.json (the training run the model is logged on),
eval.out_dir/metrics.json (it must hold eval.objective), scores.npz (what the champion gate
compares) and the PNG grids in eval.out_dir.
Output: registry.out_dir/registration.json, a DVC metrics file:
    model_name, version, decision ("promoted" | "kept"), reason (the version's description),
    objective, challenger_objective, champion_objective (both on the same evaluation, or null),
    previous_champion_version (or null), champion_version (after), run_id,
    difference, difference_interval ((challenger - champion) / champion and its bounds, each
    one-sided at min_confidence), min_confidence, min_improvement, champion_scored_again,
    per_image (each per-image metric's paired difference), fid_protocol, lock_held_s.
Refused, with nothing registered, when the training run failed or any metric is non-finite.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from dfcvae import tracking
from dfcvae.config import Config
from dfcvae.files import write_json
from dfcvae.registry import Registration, register_model
from pipeline.common import command, parse_config


def register(cfg: Config) -> Registration:
    train_dir, eval_dir = Path(cfg.train.out_dir), Path(cfg.eval.out_dir)
    run = tracking.training_run(cfg)
    if run is None:
        raise FileNotFoundError(f"{train_dir / 'run.json'} not found: run the train stage first.")
    result = register_model(cfg, train_dir / "model.pt", eval_dir / "metrics.json", eval_dir, run_id=run[1])
    write_json(dataclasses.asdict(result), Path(cfg.registry.out_dir) / "registration.json")
    return result


@command("register")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    print(register(cfg).reason)


if __name__ == "__main__":
    main(sys.argv[1:])
