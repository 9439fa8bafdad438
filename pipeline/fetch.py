"""Stage `fetch`: an inventory of data.source's images in data.inventory_dir, not a copy.

    python -m pipeline.fetch [--params params.yaml] [--set key=value ...]

The work, the sources and the files written are dfcvae/fetch.py's.
"""

from __future__ import annotations

from dfcvae.fetch import fetch
from pipeline.common import command, parse_config


@command("fetch")
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(__doc__.splitlines()[0], argv)
    info = fetch(cfg)
    where = cfg.data.inventory_dir
    print(f"fetch: {info['source']} {info.get('counts')} -> {where} (an inventory; the images stay in place)")


if __name__ == "__main__":
    main()
