"""What MLflow's system metrics (train.system_metrics_s) cost the training step, in one run.

    python -m bench.system_metrics                      # the demo's sizes, 6 blocks of 40 s
    python -m bench.system_metrics --smoke              # seconds: checks the script runs

The project's training step (dfcvae.step.make_train_step) at the demo profile's sizes runs in
blocks of equal length, alternately with the sampler off and on (dfcvae.tracking.system_metrics,
logging to a real SQLite store in a temporary folder), so both see the same machine. Prints
steps per second per block and the median of each condition; --interval sets the sampler's
period (seconds; the sampler costs most at the shortest). On a busy machine the blocks spread
more than the sampler costs, so it also measures the sampler alone: the process's CPU time while
it sleeps, with the sampler taking a sample every second and without, interleaved, which gives
CPU-seconds per sample whatever else the machine does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import yaml

from bench.throughput import project_step, random_batch
from dfcvae import tracking
from dfcvae.config import Config, MlflowConfig
from dfcvae.device import Runtime

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="blocks in all, half of them with the sampler on")
    parser.add_argument("--block-s", type=float, default=40.0, help="seconds per block")
    parser.add_argument("--interval", type=float, default=None, help="sampler period, s (default: params.yaml's)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.blocks, args.block_s = 2, 3.0
    demo = yaml.safe_load((ROOT / "pipeline" / "demo.yaml").read_text())
    cfg = Config.load(ROOT / "params.yaml").with_overrides(demo)
    interval = args.interval or cfg.train.system_metrics_s
    torch.set_num_threads(1)  # the demo's one worker has half a core; its threads would fight the sampler's
    runtime = Runtime(torch.device("cpu"))
    _, step = project_step(cfg, runtime)
    x = random_batch(cfg, runtime)
    for _ in range(3):
        step(x)
    with tempfile.TemporaryDirectory() as tmp:
        uri = tracking.setup(MlflowConfig(local_db=f"{tmp}/mlflow.db", local_artifacts=f"{tmp}/artifacts"))
        mlflow.set_tracking_uri(uri)
        run_id = tracking.start_run(cfg, "bench-system-metrics", {})
        rates: dict[bool, list[float]] = {False: [], True: []}
        for block in range(args.blocks):
            on = block % 2 == 1
            monitor = tracking.system_metrics(uri, run_id, interval, resume=block > 1) if on else None
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.block_s:
                step(x)
                steps += 1
            rate = steps / (time.perf_counter() - start)
            if monitor:
                monitor.finish()
            rates[on].append(rate)
            print(f"block {block + 1}/{args.blocks} sampler {'on ' if on else 'off'}: {rate:.2f} steps/s", flush=True)
        logged = [m for m in mlflow.MlflowClient(uri).get_run(run_id).data.metrics if m.startswith("system/")]
        per_sample = sampler_cpu(uri, run_id, args.block_s)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"sampler every {interval:g} s: median {on:.2f} steps/s on, {off:.2f} off ({on / off - 1:+.1%}); "
        f"batch {cfg.loader.batch_size} at {cfg.data.image_size} px; {len(logged)} system/* metrics logged"
    )
    print(
        f"the sampler alone: {per_sample * 1e3:.1f} ms of CPU per sample, {per_sample / interval:.2%} of one core "
        f"at one sample every {interval:g} s"
    )


def sampler_cpu(uri: str, run_id: str, seconds: float, pairs: int = 3) -> float:
    """CPU-seconds per sample of the sampler at 1 s, from the process's CPU time over idle
    periods with and without it (`pairs` of each, interleaved); the median difference."""
    differences = []
    for _ in range(pairs):
        cpu = {}
        for on in (False, True):
            monitor = tracking.system_metrics(uri, run_id, 1.0, resume=True) if on else None
            start = time.process_time()
            time.sleep(seconds)
            cpu[on] = time.process_time() - start
            if monitor:
                monitor.finish()
        differences.append((cpu[True] - cpu[False]) / seconds)  # one sample a second
    return statistics.median(differences)


if __name__ == "__main__":
    main()
