"""The throughput benchmark runs end to end at smoke size on CPU."""

import json

import pytest

from bench.throughput import format_table, main


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_smoke_writes_table_and_json(tmp_path):
    report = main(["--smoke", "--out", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == report["rows"] and saved["device"] == "cpu"
    setups = {r["setup"] for r in report["rows"]}
    assert {
        "reference (PyTorch-VAE recipe, fp32)",
        "dfcvae train step",
        "data path (shards -> device)",
        "end to end from shards",
    } <= setups
    assert all("error" not in r and r["images_per_s"] > 0 for r in report["rows"]), report["rows"]
    assert all(r["flops_per_image"] > 0 for r in report["rows"] if r["setup"] == "dfcvae train step")
    assert "| setup |" in format_table(report)
    data_rows = [r for r in report["rows"] if r["setup"] == "data path (shards -> device)"]
    assert data_rows and all(r["loader_workers"] == 2 for r in data_rows)


def test_replicated_shards_list_every_copy_with_a_matching_manifest_hash(tmp_path):
    from bench.throughput import make_shards, parse_args
    from dfcvae.config import Config
    from dfcvae.shards.format import manifest_hash, read_manifest
    from dfcvae.shards.loader import make_loader

    args = parse_args(["--smoke", "--shard-images", "144"])  # 48 unique faces, train split 3 times over
    shards_dir = make_shards(args, tmp_path)
    cfg = Config().with_overrides(
        {"data.shards_dir": shards_dir, "data.image_size": 32, "loader.batch_size": 4, "loader.num_workers": 1}
    )
    manifest = read_manifest(cfg)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) == 3 * len([s for s in train["shards"] if "-r" not in s["name"]])
    keys = [k for b in make_loader(cfg, "train", train=False) for k in b["key"]]
    assert len(keys) >= train["count"] and len(set(keys)) == train["count"] // 3
    assert (tmp_path / "shards/manifest.sha256").read_text().split()[0] == manifest_hash(cfg)


def test_reader_bench_smoke_reads_both_encodings(tmp_path):
    from bench import reader

    report = reader.main(["--smoke", "--out", str(tmp_path / "reader.json")])
    assert json.loads((tmp_path / "reader.json").read_text())["rows"] == report["rows"]
    assert {r["encoding"] for r in report["rows"]} == {"raw", "png"}
    assert all(r["images_per_cpu_s"] > 0 for r in report["rows"])
    raw, png = (next(r for r in report["rows"] if r["encoding"] == e) for e in ("raw", "png"))
    assert png["bytes_per_image"] < raw["bytes_per_image"] and raw["bytes_per_image"] > 32 * 32 * 3


def test_the_lattice_figure_shows_each_model_and_flags_the_transposed_decoders_grid(synthetic_cfg, tmp_path, capsys):
    import torch
    from PIL import Image

    from bench.lattice import main as lattice_main
    from dfcvae.model import DFCVAE

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(synthetic_cfg.to_dict()))  # JSON is YAML
    runs = []
    for upsample in ("nearest", "transposed"):
        torch.manual_seed(0)
        cfg = synthetic_cfg.with_overrides(
            {"model.upsample": upsample, "model.init": "dcgan", "model.full_res_convs": 0}
        )
        model = DFCVAE(cfg.model, cfg.data.image_size)
        torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, tmp_path / f"{upsample}.pt")
        runs += ["--run", f"{upsample}={tmp_path / f'{upsample}.pt'}"]
    out = tmp_path / "lattice.png"
    lattice_main(["--params", str(params), *runs, "--period", "2", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    peaks = {line.split(":")[0]: float(line.split()[-1]) for line in printed[:3]}
    assert peaks["test images"] == 1.0  # each row over the test images'
    assert peaks["transposed"] > peaks["nearest"] + 0.1  # untrained: the transposed one's grid (1.36 vs 1.22)
    width, height = Image.open(out).size
    assert height % 3 == 0 and height // 3 >= 32 * 3 and width > 4 * 32 * 3  # 3 rows of 4 images, 3x


def test_photographs_split_by_photograph_hold_the_hash_layouts_crops_and_share_no_scene(tmp_path):
    pytest.importorskip("skimage")
    from bench.photos import PHOTOS, write_crops
    from dfcvae.fetch import folder_split

    count = 2 * len(PHOTOS)
    flat = write_crops(tmp_path / "hash", count, 16, seed=3)
    split = write_crops(tmp_path / "photograph", count, 16, seed=3, layout="photograph")
    assert [p.read_bytes() for p in flat] == [p.read_bytes() for p in split]  # the same crops, elsewhere
    rel = [p.relative_to(tmp_path / "photograph").as_posix() for p in split]
    assert folder_split(rel) == "folders" and folder_split([p.name for p in flat]) == "hash"
    scenes = {}  # crop i comes from photograph i mod 8: every scene sits in one split
    for i, r in enumerate(rel):
        scenes.setdefault(r.split("/")[0], set()).add(i % len(PHOTOS))
    assert set(scenes) == {"train", "val", "test"}
    assert sum(len(s) for s in scenes.values()) == len(set().union(*scenes.values())) == len(PHOTOS)
    with pytest.raises(ValueError, match="layout 'folders' is not one of hash, photograph"):
        write_crops(tmp_path / "x", 1, 16, seed=0, layout="folders")
