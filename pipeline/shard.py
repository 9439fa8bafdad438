"""Stage `shard`: the images fetch inventoried, read where they lie -> webdataset tar shards.

    python -m pipeline.shard [--params params.yaml] [--set key=value ...]

The work, where it runs (shard.engine) and the files written are dfcvae/sharding.py's.
"""

from __future__ import annotations

from dfcvae.sharding import write_shards
from dfcvae.shards.format import SPLITS
from pipeline.common import command, parse_config


@command("shard")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    manifest = write_shards(cfg)
    counts = {split: manifest["splits"][split]["count"] for split in SPLITS}
    print(f"shard: {counts} ({manifest['source']}) -> {cfg.data.shards_dir}")


if __name__ == "__main__":
    main()
