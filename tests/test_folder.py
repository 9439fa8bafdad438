"""A folder of the user's own images as people have them: copies of one photo under other names,
symbolic links, other formats, names that are not UTF-8, and a layout with train/ and test/ only."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfcvae.config import Config
from dfcvae.fetch import fetch, inputs_changed
from dfcvae.inventory import REPORT_FILE, read_table, rows
from dfcvae.sharding import write_shards
from tests.test_data import make_config


def _image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _config(tmp_path: Path, folder: Path, **overrides) -> Config:
    return make_config(tmp_path, {"data.source": "folder", "data.folder_dir": str(folder), **overrides})


def _splits(cfg: Config) -> dict[str, str]:
    """The user's relative path -> its split, from what fetch wrote."""
    return {r.path: r.split_name for r in rows(read_table(Path(cfg.data.inventory_dir)))}


def test_identical_images_share_a_split_whatever_their_names(tmp_path):
    folder = tmp_path / "scraped"
    for i in range(30):
        _write(folder / f"unique/{i:02d}.png", _encoded(_image(i), "PNG"))
    copies = {}  # 24 groups of 3 identical files under unrelated names
    for g in range(24):
        content = _encoded(_image(100 + g), "PNG")
        copies[g] = [f"a/{g}.png", f"b/copy of {g}.png", f"c/IMG_{9000 + g}.png"]
        for rel in copies[g]:
            _write(folder / rel, content)
    cfg = _config(tmp_path, folder, **{"data.split_fractions": [0.5, 0.25, 0.25]})
    info = fetch(cfg)
    split = _splits(cfg)
    for group in copies.values():
        assert len({split[rel] for rel in group}) == 1, group
    assert info["duplicates"] == {"groups": 24, "extra_copies": 48, "groups_across_splits": 0}
    manifest = write_shards(cfg)
    assert manifest["dataset"]["duplicates"]["groups"] == 24
    report = json.loads((Path(cfg.data.shards_dir) / "report.json").read_text())
    assert sorted(len(g["files"]) for g in report["fetch"]["duplicates"]) == [3] * 24
    # Adding and removing other files moves no file's split.
    for i in range(30, 40):
        _write(folder / f"unique/{i:02d}.png", _encoded(_image(i), "PNG"))
    (folder / "unique/00.png").unlink()
    fetch(cfg)
    again = _splits(cfg)
    assert all(again[rel] == split[rel] for rel in split if rel != "unique/00.png")


def test_copies_across_the_users_own_splits_are_reported_not_moved(tmp_path, capfd):
    folder = tmp_path / "dataset"
    for offset, (split, n) in enumerate((("train", 8), ("val", 3), ("test", 4))):
        for i in range(n):
            _write(folder / split / f"{i}.png", _encoded(_image(100 * offset + i), "PNG"))
    _write(folder / "test/leak-0.png", (folder / "train/0.png").read_bytes())
    _write(folder / "test/leak-1.png", (folder / "train/1.png").read_bytes())
    _write(folder / "val/leak-1.png", (folder / "train/1.png").read_bytes())
    cfg = _config(tmp_path, folder)
    info = fetch(cfg)
    assert info["duplicates"] == {"groups": 2, "extra_copies": 3, "groups_across_splits": 2}
    err = capfd.readouterr().err
    assert "2 groups of identical images (5 files) lie in more than one of your train/val/test folders" in err
    split = _splits(cfg)
    assert split["test/leak-0.png"] == "test" and split["val/leak-1.png"] == "val"  # where the user put them
    write_shards(cfg)
    report = json.loads((Path(cfg.data.shards_dir) / "report.json").read_text())
    assert {tuple(sorted(g["splits"])) for g in report["fetch"]["duplicates"]} == {
        ("test", "train"),
        ("test", "train", "val"),
    }


def test_symbolic_links_to_files_and_folders_are_followed_once_and_counted(tmp_path):
    folder, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    for i in range(31):
        _write(folder / f"own/{i}.png", _encoded(_image(i), "PNG"))
    for i in range(28):
        _write(elsewhere / f"trip/{i}.png", _encoded(_image(200 + i), "PNG"))
    _write(elsewhere / "single.png", _encoded(_image(300), "PNG"))
    (folder / "trip").symlink_to(elsewhere / "trip", target_is_directory=True)
    (folder / "single.png").symlink_to(elsewhere / "single.png")
    (folder / "own/loop").symlink_to(folder, target_is_directory=True)  # a cycle
    (folder / "trip-again").symlink_to(elsewhere / "trip", target_is_directory=True)
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    cfg = _config(tmp_path, folder, **{"data.split_fractions": [0.6, 0.2, 0.2]})
    info = fetch(cfg)
    assert info["count"] == 31 + 28 + 1 and info["links_followed"] == 5
    report = json.loads((Path(cfg.data.inventory_dir) / REPORT_FILE).read_text())
    skipped = {e["file"]: e["reason"] for e in report["skipped"]}
    assert skipped["own/loop"] == "the folder . again (through a link): read once"
    assert skipped["trip-again"].startswith("the folder trip again")
    assert skipped["gone.png"] == "a link to nothing"
    assert inputs_changed(cfg) is None
    _write(elsewhere / "trip/new.png", _encoded(_image(400), "PNG"))  # retrain sees it
    assert "changed since the last fetch (1 added, 0 removed, 0 changed)" in inputs_changed(cfg)


def test_formats_pillow_reads_go_in_and_every_other_file_is_listed_with_its_reason(tmp_path, capfd):
    folder = tmp_path / "mixed"
    frames = [_image(7 + k, mode="P") for k in range(3)]
    made = {
        "a.bmp": _encoded(_image(1), "BMP"),
        "b.tif": _encoded(_image(2), "TIFF"),
        "c.tiff": _encoded(_image(3), "TIFF", compression="tiff_lzw"),
        "d.webp": _encoded(_image(4), "WEBP", lossless=True),
        "e.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "f-palette.png": _encoded(_image(5, mode="P"), "PNG"),
        "g-16bit.png": _encoded(Image.fromarray(np.full((40, 48), 51400, np.uint16)), "PNG"),
        "h.jpg": _encoded(_image(6), "JPEG"),
        "i.HEIC": b"\x00\x00\x00\x18ftypheic" + bytes(64),
        "j.txt": b"notes",
        "k.NEF": bytes(100),
    }
    for rel, content in made.items():
        _write(folder / rel, content)
    for i in range(20):  # enough for three splits
        _write(folder / f"more/{i}.jpg", _encoded(_image(50 + i), "JPEG"))
    cfg = _config(tmp_path, folder, **{"data.split_fractions": [0.5, 0.25, 0.25]})
    info = fetch(cfg)
    assert info["count"] == 28 and info["skipped"] == 3
    assert "3 files under" in capfd.readouterr().err
    manifest = write_shards(cfg)
    report = json.loads((Path(cfg.data.shards_dir) / "report.json").read_text())
    assert report["counts"] == {**manifest["raw"], "in": 28, "rejected": 0, "written": 28}
    notes = {e["file"]: e["reason"] for e in report["converted"]}
    assert notes["e.gif"].startswith("GIF: the first of 3 frames")
    assert notes["g-16bit.png"] == "I;16 (16-bit) -> 8-bit RGB" and notes["f-palette.png"] == "P -> RGB"
    skipped = {e["file"]: e["reason"] for e in report["fetch"]["skipped"]}
    assert skipped == {
        "i.HEIC": "HEIC/HEIF, which Pillow cannot read: convert it to JPEG or PNG",
        "j.txt": "not an image type read here (.txt)",
        "k.NEF": "a camera raw file: develop it to JPEG, PNG or TIFF first",
    }
    assert report["counts"]["in"] + len(skipped) == len(made) + 20  # every file is counted somewhere


def test_file_names_that_are_not_utf8_or_hold_a_newline_work(tmp_path):
    folder = tmp_path / "names"
    odd = [b"caf\xe9.png", b"new\nline.png", b"\xff\xfe.png", "ünïcode ✓.png".encode()]
    for i, name in enumerate(odd):
        _write(Path(os.fsdecode(bytes(folder) + b"/" + name)), _encoded(_image(i), "PNG"))
    for i in range(12):
        _write(folder / f"{i}.png", _encoded(_image(20 + i), "PNG"))
    cfg = _config(tmp_path, folder, **{"data.split_fractions": [0.5, 0.25, 0.25]})
    fetch(cfg)
    paths = {os.fsencode(r.path) for r in rows(read_table(Path(cfg.data.inventory_dir)))}
    assert paths >= set(odd)  # the user's exact bytes
    manifest = write_shards(cfg)
    assert manifest["raw"]["written"] == 16
    report = (Path(cfg.data.shards_dir) / "report.json").read_text()
    assert json.loads(report)["counts"]["in"] == 16
    assert inputs_changed(cfg) is None


@pytest.mark.parametrize("missing, carved_from_train", [("val", "val"), ("test", "test")])
def test_a_folder_without_val_or_test_carves_it_out_of_train(tmp_path, capfd, missing, carved_from_train):
    folder = tmp_path / "public"
    layout = {"train": 40, "val": 6, "test": 6}
    del layout[missing]
    for offset, (split, n) in enumerate(layout.items()):
        for i in range(n):
            _write(folder / split / f"{i}.png", _encoded(_image(100 * offset + i), "PNG"))
    cfg = _config(tmp_path, folder, **{"data.split_fractions": [0.75, 0.125, 0.125]})
    info = fetch(cfg)
    assert info["split"] == "folders"
    carved = info["counts"][carved_from_train]
    assert 0 < carved < 40 and info["counts"]["train"] == 40 - carved
    assert f"the folder has no {missing}/ folder: {missing} is 14.3% of train/" in capfd.readouterr().err
    split = _splits(cfg)
    other = next(s for s in ("val", "test") if s != missing)
    assert all(split[rel] == other for rel in split if rel.startswith(other + "/"))  # the user's split kept
    assert {split[rel] for rel in split if rel.startswith("train/")} == {"train", missing}
    manifest = write_shards(cfg)
    assert manifest["dataset"]["carved"] == info["carved"] and len(info["carved"]) == 1
