"""Loader read speed per core: shards -> uint8 batches in one process, by encoding and image size.

    python -m bench.reader                  # 64 and 128 px, raw and png
    python -m bench.reader --smoke          # tiny sizes, checks the script runs

Each row reads the train split of a synthetic shard set through `make_loader` with no
DataLoader processes: tar walk, checksums, decoding, the shuffle buffer and collation, which is
everything a loader process does per image except handing the batch over. The same shards are
read again with loader.verify_shards, every epoch a first read (each shard hashed before use), and
then by webdataset's own pipeline, `WebDataset(urls).decode("rgb8").to_tuple(image,
"attrs").batched(B)`.

The walker columns isolate what the hand-written tar walker (dfcvae/shards/tar.py) adds: the
same shards are walked and grouped into samples by our `read_segment`, and by webdataset's
`tar_file_iterator` + `group_by_keys`, both feeding our own decoders (`decode_image`,
`decode_attrs`), with no shuffle, collation or hashing on either side.

Every figure is images per second of CPU time, the best of `--repeats` epochs with the readers
interleaved, so other jobs on the machine do not skew it. Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dfcvae.config import Config
from dfcvae.fetch import fetch
from dfcvae.sharding import write_shards
from dfcvae.shards.format import ATTRS_MEMBER, IMAGE_MEMBERS, decode_attrs, decode_image, read_manifest
from dfcvae.shards.loader import _VERIFIED, make_loader, read_segment
from dfcvae.shards.plan import Segment


def shard_config(root: Path, image_size: int, encoding: str, images: int) -> Config:
    return Config().with_overrides(
        {
            "data.source": "synthetic",
            "data.synthetic_count": images,
            "data.inventory_dir": str(root / "inventory"),
            "data.shards_dir": str(root / f"shards-{image_size}-{encoding}"),
            "data.image_size": image_size,
            "data.encoding": encoding,
            "data.samples_per_shard": max(images // 8, 16),
            "loader.batch_size": min(256, images // 8),
            "loader.num_workers": 1,
        }
    )


def images_per_cpu_second(cfg: Config, repeats: int) -> float:
    """With cfg.loader.verify_shards, every epoch is a first read: each shard is hashed again."""
    best = 0.0
    for _ in range(repeats):
        _VERIFIED.clear()
        start, images = time.process_time(), 0
        for batch in make_loader(cfg, "train", train=True, num_workers=0):
            images += len(batch["key"])
        best = max(best, images / (time.process_time() - start))
    return best


def webdataset_images_per_cpu_second(cfg: Config) -> float:
    """One epoch of the train shards through webdataset's pipeline, batched like ours."""
    import webdataset as wds

    shards = Path(cfg.data.shards_dir)
    urls = [str(shards / s["name"]) for s in read_manifest(cfg)["splits"]["train"]["shards"]]
    image = IMAGE_MEMBERS[cfg.data.encoding]
    pipeline = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple(image, ATTRS_MEMBER)
    start, images = time.process_time(), 0
    for batch in pipeline.batched(cfg.loader.batch_size):
        images += len(batch[0])
    return images / (time.process_time() - start)


def walker_images_per_cpu_second(cfg: Config, walker: str) -> float:
    """One epoch of the train shards walked by `walker` ("ours" | "webdataset") into samples,
    each decoded by our decoders."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    size, image = cfg.data.image_size, IMAGE_MEMBERS[cfg.data.encoding]
    shards = read_manifest(cfg)["splits"]["train"]["shards"]
    start, images = time.process_time(), 0
    for shard in shards:
        url = str(Path(cfg.data.shards_dir) / shard["name"])
        if walker == "ours":
            samples = read_segment(Segment(url, 0, shard["count"], shard["count"]), image)
            for sample in samples:
                decode_image(image, sample[image], size), decode_attrs(sample[ATTRS_MEMBER])
                images += 1
        else:
            with open(url, "rb") as stream:
                members = ({**member, "__url__": url} for member in tar_file_iterator(stream))
                for sample in group_by_keys(members):
                    decode_image(image, sample[image], size), decode_attrs(sample[ATTRS_MEMBER])
                    images += 1
    return images / (time.process_time() - start)


def disk_per_image(cfg: Config) -> float:
    manifest = read_manifest(cfg)["splits"]["train"]
    shards = Path(cfg.data.shards_dir)
    return sum((shards / s["name"]).stat().st_size for s in manifest["shards"]) / manifest["count"]


def run(args: argparse.Namespace) -> dict:
    report = {"date": time.strftime("%Y-%m-%d"), "images": args.images, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for encoding in args.encodings:
                cfg = shard_config(Path(tmp), size, encoding, args.images)
                if size == args.sizes[0] and encoding == args.encodings[0]:
                    fetch(cfg)  # the same raw faces for every row
                write_shards(cfg)
                unchecked = cfg.with_overrides({"loader.verify_shards": False})
                ours, checked, theirs, walk_ours, walk_theirs = 0.0, 0.0, 0.0, 0.0, 0.0
                for _ in range(args.repeats):  # interleaved, the best of each
                    ours = max(ours, images_per_cpu_second(unchecked, 1))
                    checked = max(checked, images_per_cpu_second(cfg, 1))
                    theirs = max(theirs, webdataset_images_per_cpu_second(cfg))
                    walk_ours = max(walk_ours, walker_images_per_cpu_second(cfg, "ours"))
                    walk_theirs = max(walk_theirs, walker_images_per_cpu_second(cfg, "webdataset"))
                row = {
                    "image_size": size,
                    "encoding": encoding,
                    "images_per_cpu_s": ours,
                    "first_read_checked_images_per_cpu_s": checked,
                    "webdataset_images_per_cpu_s": theirs,
                    "our_walker_images_per_cpu_s": walk_ours,
                    "webdataset_walker_images_per_cpu_s": walk_theirs,
                    "bytes_per_image": disk_per_image(cfg),
                }
                report["rows"].append(row)
                print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    lines = [
        "| image size | encoding | images/s per core | first read, sha256 checked | webdataset's pipeline "
        "| our walker + our decoders | webdataset's walker + our decoders | disk per image |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['image_size']} px | {r['encoding']} | {r['images_per_cpu_s']:,.0f} | "
            f"{r['first_read_checked_images_per_cpu_s']:,.0f} | "
            f"{r['webdataset_images_per_cpu_s']:,.0f} | {r['our_walker_images_per_cpu_s']:,.0f} | "
            f"{r['webdataset_walker_images_per_cpu_s']:,.0f} | {r['bytes_per_image'] / 1024:.1f} KiB |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run that checks the script works")
    parser.add_argument("--out", default="outputs/bench/reader.json")
    parser.add_argument("--images", type=int, default=4000, help="synthetic faces per shard set (train: 80%%)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per row; the fastest counts")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[64, 128])
    parser.add_argument("--encodings", type=lambda s: s.split(","), default=list(IMAGE_MEMBERS))
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.repeats, args.sizes = 80, 1, [32]
    return args


def main(argv: list[str] | None = None) -> dict:
    report = run(parse_args(argv))
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
