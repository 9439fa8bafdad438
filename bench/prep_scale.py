"""Data preparation at scale: fetch, shard and DVC's bookkeeping on a large folder of images.

    python -m bench.prep_scale images --out /tmp/faces --count 100000
    python -m bench.prep_scale run --project CLONE --images /tmp/faces --out result.json
    python -m bench.prep_scale throughput --images /tmp/faces --count 20000 --out result.json

`images` draws --count distinct synthetic faces (dfcvae.synthetic, JPEG quality 92, about 5.5 kB
each) into 1000-image subfolders, over all cores; an existing folder with that many is kept.

`run` takes CLONE, a git clone of this project at any commit (so the same command measures an
older fetch beside the current one), points its params.yaml at the folder (data.source: folder)
and times, each in a fresh process with its peak resident memory (the largest process):

    dvc repro fetch    the fetch stage (its own wall time and memory too), then DVC's hashing
                       and caching of its output
    dvc repro shard    likewise for the shard stage
    dvc status         the check a user (and the retrain command) runs afterwards

and the disk each part takes: the source folder, the pipeline's outputs (data/raw and
data/shards), and DVC's cache.

`throughput` fetches the folder once, keeps the first --count images of its inventory, and
shards them (the params.yaml defaults: 64 px, raw encoding) with 1 and with 2 local worker
processes, and as Ray tasks on a local cluster of 2 nodes of 1 CPU each (ray.cluster_utils, two
raylets on this machine), --rounds times interleaved. Each run gives images per second of wall
time and per CPU-second: the machine's busy CPU time during the run (psutil.cpu_times, all
processes: a quiet machine is assumed), which counts Ray's own processes too.
The figures are in docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"wall_s": time.perf_counter() - t, "peak_mib": peak / 1024, "rc": rc}))
sys.exit(rc)
"""


def _draw(task: tuple[Path, list[int]]) -> int:
    from dfcvae.synthetic import draw_face

    out, indices = task
    for i in indices:
        image, _ = draw_face(random.Random(f"prep-scale:{i}"))
        image.save(out / f"{i // 1000:03d}" / f"{i:06d}.jpg", quality=92)
    return len(indices)


def make_images(out: Path, count: int) -> None:
    if out.is_dir() and sum(1 for _ in out.rglob("*.jpg")) == count:
        print(f"prep_scale: {out} already holds {count} images")
        return
    shutil.rmtree(out, ignore_errors=True)
    for k in range((count + 999) // 1000):
        (out / f"{k:03d}").mkdir(parents=True)
    from tqdm import tqdm

    chunks = [list(range(s, min(s + 500, count))) for s in range(0, count, 500)]
    with multiprocessing.get_context("fork").Pool() as pool, tqdm(total=count, desc="draw", unit="img") as bar:
        for n in pool.imap_unordered(_draw, [(out, c) for c in chunks]):
            bar.update(n)


def _du(path: Path) -> int:
    """Bytes on disk under path (du -sb: apparent sizes; hard links counted once)."""
    if not path.exists():
        return 0
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def _measure(cwd: Path, name: str, cmd: list[str]) -> dict:
    out = cwd / f".prep_scale_{name}.json"
    subprocess.run([sys.executable, ".prep_scale_measure.py", str(out), *cmd], cwd=cwd, check=True)
    result = json.loads(out.read_text())
    print(f"prep_scale: {name}: {result['wall_s']:.1f} s, {result['peak_mib']:.0f} MiB", flush=True)
    return result


def run(project: Path, images: Path, out: Path) -> dict:
    from ruamel.yaml import YAML

    subprocess.run(
        ["git", "checkout", "--", "params.yaml", "dvc.yaml"], cwd=project, check=True
    )  # an earlier run's edits
    (project / "dvc.lock").unlink(missing_ok=True)
    yaml = YAML()
    params_path = project / "params.yaml"
    params = yaml.load(params_path)
    params["data"]["source"] = "folder"
    params["data"]["folder_dir"] = str(images.resolve())
    yaml.dump(params, params_path)
    stages_path = project / "dvc.yaml"
    stages = yaml.load(stages_path)
    (project / ".prep_scale_measure.py").write_text(MEASURE)
    for stage in ("fetch", "shard"):  # each stage's own time and memory, apart from DVC's
        cmd = stages["stages"][stage]["cmd"].replace("python", sys.executable, 1)
        stages["stages"][stage]["cmd"] = f"{sys.executable} .prep_scale_measure.py .prep_scale_{stage}_stage.json {cmd}"
    yaml.dump(stages, stages_path)
    fetched = "inventory_dir" if "inventory_dir" in params["data"] else "raw_dir"  # raw_dir: a copy, before
    outputs = {name: project / params["data"][key] for name, key in (("fetch", fetched), ("shard", "shards_dir"))}
    for path in [*outputs.values(), project / ".dvc" / "cache"]:  # a clone may hold an earlier run's
        shutil.rmtree(path, ignore_errors=True)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    result = {
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True
        ).stdout.strip()
    }
    result["images"] = sum(1 for _ in images.rglob("*.jpg"))
    result["cores"] = len(os.sched_getaffinity(0))
    for stage in ("fetch", "shard"):
        result[f"dvc repro {stage}"] = _measure(project, stage, [*dvc, "repro", "--single-item", stage])
        result[f"{stage} stage"] = json.loads((project / f".prep_scale_{stage}_stage.json").read_text())
    result["dvc status"] = _measure(project, "status", [*dvc, "status"])
    result["disk_bytes"] = {
        "source": _du(images),
        **{f"{name} output": _du(path) for name, path in outputs.items()},
        "dvc cache": _du(project / ".dvc" / "cache"),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


def _shard_run(cfg, engine: str, workers: int) -> dict:
    import psutil

    from dfcvae.sharding import write_shards

    cfg = cfg.with_overrides({"shard.engine": engine, "shard.workers": workers})
    before, t = psutil.cpu_times(), time.perf_counter()
    manifest = write_shards(cfg)
    wall, after = time.perf_counter() - t, psutil.cpu_times()
    busy = sum(after) - after.idle - after.iowait - (sum(before) - before.idle - before.iowait)
    images = manifest["raw"]["written"]
    return {"wall_s": wall, "cpu_s": busy, "img_per_s": images / wall, "img_per_cpu_s": images / busy}


def throughput(images: Path, count: int, rounds: int, out: Path) -> dict:
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from dfcvae.config import Config
    from dfcvae.fetch import fetch
    from dfcvae.inventory import INVENTORY_FILE, read_table

    work = Path(tempfile.mkdtemp(prefix="prep-scale-"))
    cfg = Config().with_overrides(
        {
            "data.source": "folder",
            "data.folder_dir": str(images.resolve()),
            "data.inventory_dir": str(work / "inventory"),
            "data.shards_dir": str(work / "shards"),
        }
    )
    fetch(cfg)
    inventory = Path(cfg.data.inventory_dir)
    pq.write_table(read_table(inventory).slice(0, count), inventory / INVENTORY_FILE, compression="zstd")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    runs: dict[str, list[dict]] = {"local, 1 process": [], "local, 2 processes": [], "Ray, 2 nodes x 1 CPU": []}
    try:
        for r in range(rounds):
            for name, engine, workers in (
                ("local, 1 process", "local", 1),
                ("local, 2 processes", "local", 2),
                ("Ray, 2 nodes x 1 CPU", "ray", 2),
            ):
                runs[name].append(_shard_run(cfg, engine, workers))
                print(f"prep_scale: round {r + 1} {name}: {runs[name][-1]}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    result = {"images": count, "cores": len(os.sched_getaffinity(0)), "rounds": rounds, "runs": runs}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=100_000)
    p = sub.add_parser("throughput")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("run")
    p.add_argument("--project", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "images":
        make_images(args.out, args.count)
    elif args.command == "throughput":
        throughput(args.images, args.count, args.rounds, args.out)
    else:
        run(args.project, args.images, args.out)


if __name__ == "__main__":
    main()
