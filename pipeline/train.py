"""Stage `train`: DFC-VAE on Ray Train (DDP), tracked in MLflow.

Runs the same way as a DVC stage, from a shell, and under
`ray job submit --working-dir . -- python -m pipeline.train` (RAY_ADDRESS set).
Outputs (train.out_dir): model.pt (VAE weights + config), metrics.json,
log.csv (per-step curves for `dvc plots`), run.json (the MLflow run id);
dfcvae/train.py documents each.
"""

from __future__ import annotations

import json
import sys

from dfcvae.train import train
from pipeline.common import command, parse_config, with_best_overrides


@command("train")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    metrics = train(with_best_overrides(cfg))
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("val/")}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
