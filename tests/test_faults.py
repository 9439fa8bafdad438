"""Faults that must end in one sentence with nothing lost: a full disk, a folder the project did
not write, and a stage interrupted mid-write. Real file systems: a small tmpfs for the full disk."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from dfcvae import sharding
from dfcvae.config import UserError
from dfcvae.fetch import fetch
from dfcvae.files import DiskFullError
from dfcvae.sharding import write_shards
from pipeline.shard import main as shard_main
from tests.test_data import make_config


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int):
    """A tmpfs of size_kb mounted at path: a real file system that fills up."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _manifest(cfg) -> str:
    return (Path(cfg.data.shards_dir) / "manifest.json").read_text()


def test_a_full_disk_keeps_the_previous_shards_and_says_how_much_is_needed(tmp_path, monkeypatch, capsys):
    # The new set is written beside the old one and swapped in: the disk must hold both for a moment.
    with small_disk(tmp_path / "disk", 500) as disk:
        cfg = make_config(tmp_path, {"data.shards_dir": str(disk / "shards")})
        fetch(cfg)
        write_shards(cfg)  # 33 images of 32 px: about 150 KB
        before = _manifest(cfg)
        bigger = cfg.with_overrides({"data.image_size": 64})  # about 460 KB: does not fit
        with pytest.raises(
            DiskFullError,
            match=r"the disk holding .*shards\.partial is full for the shards: .* MB free, about 0\.5 MB needed",
        ):
            write_shards(bigger)
        assert _manifest(cfg) == before  # the previous set, whole
        # The estimate passes but the disk fills while writing (a real ENOSPC in a worker process):
        # the same sentence, no retry, and no half-written shard left behind.
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(bigger.to_dict()))
        with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
            patch.setattr(sharding, "_set_bytes", lambda cfg, count: 0)
            shard_main(["--params", str(params)])
        assert str(stopped.value.code).startswith("shard: the disk holding ") and "\n" not in str(stopped.value.code)
        assert _manifest(cfg) == before
        assert not list((disk / "shards.partial").glob("*.tmp"))  # a finished shard may stay, for a rerun
        manifest = write_shards(cfg)  # with the space there, the stage simply runs
        assert manifest["preprocessing"]["image_size"] == 32


def test_folders_the_project_did_not_write_are_never_replaced(tmp_path):
    mine = tmp_path / "my-photos"
    mine.mkdir()
    (mine / "holiday.txt").write_text("the user's own file")
    cfg = make_config(tmp_path, {"data.inventory_dir": str(mine)})
    with pytest.raises(UserError, match=r"my-photos holds files this project did not write \(such as holiday\.txt\)"):
        fetch(cfg)
    cfg = make_config(tmp_path, {"data.shards_dir": str(mine)})
    fetch(cfg)
    with pytest.raises(UserError, match="holds files this project did not write"):
        write_shards(cfg)
    assert [p.name for p in mine.iterdir()] == ["holiday.txt"]


def test_an_interrupted_shard_stage_leaves_the_previous_set_and_the_next_run_resumes(tmp_path, monkeypatch):
    cfg = make_config(tmp_path)
    fetch(cfg)
    write_shards(cfg)
    before = _manifest(cfg)
    real = sharding.run_tasks

    def killed(cfg, tasks):
        yield from real(cfg, tasks[:1])  # one shard finishes,
        raise KeyboardInterrupt  # then Ctrl-C, or dvc's kill, mid-write

    partial = Path(cfg.data.shards_dir + ".partial")
    finished = partial / "train-000000.tar"
    firsts = []
    for seed in (6, 5):  # the second plan differs: the first one's finished shard is not reused
        with monkeypatch.context() as patch:
            patch.setattr(sharding, "run_tasks", killed)
            with pytest.raises(KeyboardInterrupt):
                write_shards(cfg.with_overrides({"data.seed": seed}))
        assert _manifest(cfg) == before
        assert (partial / "train-000000.tar.json").is_file() and not list(partial.glob("*.tmp"))
        firsts.append(finished.read_bytes())
    assert firsts[0] != firsts[1]
    stamp = finished.stat().st_mtime_ns
    # A swap cut short between its two renames: the old set is put back before anything else.
    shards = Path(cfg.data.shards_dir)
    shards.rename(shards.with_name("shards.old"))
    interrupted = cfg.with_overrides({"data.seed": 5})
    manifest = write_shards(interrupted)
    assert manifest["preprocessing"]["order_seed"] == 5 and json.loads(_manifest(cfg)) == manifest
    assert (shards / "train-000000.tar").stat().st_mtime_ns == stamp  # resumed: the finished shard kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("shards")) == ["shards"]
    assert sorted(p.name for p in shards.iterdir() if not p.name.endswith(".tar")) == [
        ".dfcvae-output",
        "manifest.json",
        "manifest.sha256",
        "report.json",
    ]


def test_a_bundle_is_replaced_whole_and_never_over_the_users_files(tmp_path):
    from PIL import Image

    from dfcvae.bundle import load_bundle, write_bundle
    from dfcvae.config import Config
    from dfcvae.model import DFCVAE

    cfg = Config().with_overrides({"model.hidden_channels": [8, 16], "model.latent_dim": 8, "data.image_size": 32})
    state = {"model": DFCVAE(cfg.model, 32).state_dict(), "config": cfg.to_dict(), "step": 1}
    grids = {}
    for name in ("samples", "reconstructions"):
        grids[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (8, 8)).save(grids[name])
    out = tmp_path / "bundle"
    write_bundle(state, out, grids=grids)
    assert (out / "samples.png").is_file()
    write_bundle(state, out, grids={"reconstructions": grids["reconstructions"]})  # fewer pictures now
    assert not (out / "samples.png").exists()  # nothing of the earlier bundle is left to mix in
    load_bundle(out)
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("the user's own file")
    with pytest.raises(UserError, match=r"Documents holds files this project did not write \(such as thesis\.tex\)"):
        write_bundle(state, mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_a_picture_is_never_written_over_a_file_the_project_did_not_write(tmp_path):
    """pipeline.sample --out, the evaluation's grids: they replace their own pictures, nothing else."""
    import torch
    from PIL import Image

    from dfcvae.pictures import save_grid

    images = torch.zeros(4, 3, 8, 8)
    mine = tmp_path / "holiday.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(mine)
    before = mine.read_bytes()
    with pytest.raises(UserError, match="holiday.png exists and is not a picture this project wrote"):
        save_grid(images, mine, nrow=2)
    assert mine.read_bytes() == before
    ours = save_grid(images, tmp_path / "samples.png", nrow=2)
    save_grid(images - 1, ours, nrow=2)  # its own picture: replaced
    assert Image.open(ours).getpixel((3, 3)) == (0, 0, 0)
