"""Data preparation that scales out: the same shards whatever runs them, sources and outputs in
object storage, images changed after fetch refused, and a shard task killed mid-write retried."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from dfcvae.config import Config, UserError
from dfcvae.fetch import fetch, inputs_changed
from dfcvae.sharding import write_shards
from dfcvae.shards.format import DataError
from tests.conftest import tiny_config
from tests.test_bucket import BUCKET, s3  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(600)


def _photo(seed: int, side: int) -> bytes:
    """A smooth random picture of side x side px as JPEG: decoding it costs what a photograph's does."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), "RGB")
    out = io.BytesIO()
    small.resize((side, side), Image.BILINEAR).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _folder(root: Path, counts: dict[str, int], side: int = 48) -> Path:
    """train/, val/ and test/ folders of distinct pictures."""
    seed = 0
    for split, n in counts.items():
        (root / split).mkdir(parents=True)
        for i in range(n):
            seed += 1
            (root / split / f"{i:03d}.jpg").write_bytes(_photo(seed, side))
    return root


def _config(tmp: Path, folder: str, **overrides) -> Config:
    return tiny_config(
        tmp, **{"data.source": "folder", "data.folder_dir": folder, "data.crop_size": "square", **overrides}
    )


def _set(cfg: Config) -> dict[str, str]:
    """Every file of the shard set -> its sha256 (local data.shards_dir)."""
    root = Path(cfg.data.shards_dir)
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if not p.name.startswith(".")
    }


@pytest.mark.slow  # a Ray cluster, or the S3 server
def test_shards_are_byte_identical_with_1_2_and_3_workers_and_on_ray(tmp_path, ray_cluster):
    folder = _folder(tmp_path / "photos", {"train": 21, "val": 6, "test": 5})
    base = _config(tmp_path, str(folder), **{"data.samples_per_shard": 4})
    fetch(base)
    sets = {}
    for engine, workers in (("local", 1), ("local", 2), ("local", 3), ("ray", 3)):
        cfg = base.with_overrides(
            {"shard.engine": engine, "shard.workers": workers, "data.shards_dir": str(tmp_path / f"{engine}{workers}")}
        )
        write_shards(cfg)
        sets[(engine, workers)] = _set(cfg)
    first = sets[("local", 1)]
    assert sum(name.endswith(".tar") for name in first) == 6 + 2 + 2  # ceil(21/4), ceil(6/4), ceil(5/4)
    for key, files in sets.items():
        assert files == first, key  # every tar, the manifest and the report


@pytest.mark.slow  # a Ray cluster, or the S3 server
def test_a_bucket_source_and_a_bucket_set_match_the_local_ones(tmp_path, s3):  # noqa: F811
    import boto3

    from dfcvae.shards.format import read_manifest
    from dfcvae.shards.loader import make_loader

    folder = _folder(tmp_path / "photos", {"train": 9, "val": 3, "test": 3})
    client = boto3.client("s3")
    for path in sorted(folder.rglob("*.jpg")):
        client.put_object(Bucket=BUCKET, Key=f"photos/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    client.put_object(Bucket=BUCKET, Key="photos/notes.txt", Body=b"not an image")
    local = _config(tmp_path / "local", str(folder), **{"data.samples_per_shard": 4})
    remote = _config(
        tmp_path / "remote",
        f"s3://{BUCKET}/photos",
        **{"data.samples_per_shard": 4, "data.shards_dir": f"s3://{BUCKET}/shards"},
    )
    assert fetch(remote)["counts"] == fetch(local)["counts"] == {"train": 9, "val": 3, "test": 3}
    report = json.loads((Path(remote.data.inventory_dir) / "report.json").read_text())
    assert report["skipped"] == [{"file": "notes.txt", "reason": "not an image type read here (.txt)"}]
    write_shards(local)
    client.put_object(Bucket=BUCKET, Key="shards/keep/mine.tar", Body=b"the user's own")
    with pytest.raises(
        UserError, match=r"shards holds objects this project did not write \(such as .*keep/mine\.tar\)"
    ):
        write_shards(remote)  # refused before any work, the object untouched
    assert client.get_object(Bucket=BUCKET, Key="shards/keep/mine.tar")["Body"].read() == b"the user's own"
    client.delete_object(Bucket=BUCKET, Key="shards/keep/mine.tar")
    write_shards(remote)
    listed = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="shards")["Contents"])
    assert not any(
        ".partial" in key or key.endswith(".json") and "manifest" not in key and "report" not in key for key in listed
    )
    tars = {name: digest for name, digest in _set(local).items() if name.endswith(".tar")}
    assert len(tars) == 3 + 1 + 1
    for name, digest in tars.items():  # the same bytes, read from and written to the bucket
        body = client.get_object(Bucket=BUCKET, Key=f"shards/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, name
    assert read_manifest(remote)["splits"] == read_manifest(local)["splits"]
    assert read_manifest(remote)["dataset"]["folder_dir"] == f"s3://{BUCKET}/photos"
    batch = next(iter(make_loader(remote, "train", train=False, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 3, 32, 32)
    assert inputs_changed(remote) is None
    client.put_object(Bucket=BUCKET, Key="photos/train/new.jpg", Body=_photo(99, 48))
    assert "(1 added, 0 removed, 0 changed)" in inputs_changed(remote)


def test_an_image_changed_or_gone_after_fetch_stops_the_stage_and_keeps_the_set(tmp_path):
    folder = _folder(tmp_path / "photos", {"train": 6, "val": 2, "test": 2})
    cfg = _config(tmp_path, str(folder))
    fetch(cfg)
    write_shards(cfg)
    before = _set(cfg)
    (folder / "train" / "002.jpg").write_bytes(_photo(1234, 48))  # same name, other pixels
    again = cfg.with_overrides({"data.seed": 1})  # a new set is wanted, and cannot be made
    with pytest.raises(
        DataError, match=r"photos/train/002\.jpg has changed since fetch listed it: run `dvc repro -f fetch`"
    ):
        write_shards(again)
    (folder / "val" / "001.jpg").unlink()
    fetch(cfg)
    (folder / "test" / "000.jpg").unlink()
    with pytest.raises(DataError, match=r"photos/test/000\.jpg is gone since fetch listed it"):
        write_shards(again)
    assert _set(cfg) == before  # the previous set, whole


@pytest.mark.slow  # a Ray cluster, or the S3 server
def test_a_shard_task_killed_mid_write_is_retried_and_no_partial_shard_is_listed(tmp_path, ray_cluster):
    """SIGKILL to the Ray worker process holding a shard's .tmp file open; Ray runs the task again."""
    folder = _folder(tmp_path / "photos", {"train": 60, "val": 2, "test": 2}, side=1600)  # about 1 s a shard
    cfg = _config(tmp_path, str(folder), **{"data.samples_per_shard": 20, "shard.engine": "ray", "shard.workers": 1})
    fetch(cfg)
    partial = Path(cfg.data.shards_dir + ".partial")
    killed: list[str] = []

    def kill_a_writer() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            for tmp in partial.glob("train-*.tmp") if partial.is_dir() else []:
                for proc in psutil.process_iter(["pid", "name"]):
                    try:
                        if any(f.path == str(tmp) for f in proc.open_files()):
                            killed.append(f"{proc.info['name']} {tmp.name}")
                            os.kill(proc.pid, signal.SIGKILL)
                            return
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_writer)
    killer.start()
    manifest = write_shards(cfg)
    killer.join()
    assert killed and "write_planned" in killed[0], killed  # a Ray worker, mid-shard
    shards = Path(cfg.data.shards_dir)
    assert not list(shards.glob("*.tmp")) and not partial.exists()
    listed = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert sum(s["count"] for s in listed) == 64 and len(listed) == 5
    for entry in listed:  # every shard listed is whole
        assert hashlib.sha256((shards / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    uninterrupted = cfg.with_overrides({"shard.engine": "local", "data.shards_dir": str(tmp_path / "local")})
    write_shards(uninterrupted)
    assert _set(uninterrupted) == _set(cfg)


def test_a_repository_from_before_the_inventory_is_told_what_to_run(tmp_path):
    import yaml

    from dfcvae.config import ConfigError

    old = Config().to_dict()
    old["data"]["raw_dir"] = "data/raw"  # params.yaml as an older checkout wrote it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"remove data\.raw_dir from params\.yaml .*then run `dvc repro`\.$"):
        Config.load(tmp_path / "params.yaml")
    assert Config.from_stored(old).data.inventory_dir == "data/inventory"  # a model stored back then still loads
    copy = tmp_path / "raw"  # an older fetch's copy where the inventory is looked for
    (copy / "img_align_celeba").mkdir(parents=True)
    (copy / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    cfg = tiny_config(tmp_path, **{"data.inventory_dir": str(copy)})
    with pytest.raises(
        DataError, match=r"holds a copy of the images made by an older fetch, not an inventory: run `dvc"
    ):
        write_shards(cfg)


def test_a_shard_whose_images_are_all_rejected_is_left_out_of_the_manifest(tmp_path):
    folder = _folder(tmp_path / "photos", {"train": 5, "val": 2, "test": 2})
    (folder / "train" / "003.jpg").write_bytes(_photo(77, 48)[:300])  # cut short: rejected
    cfg = _config(tmp_path, str(folder), **{"data.samples_per_shard": 1, "data.max_reject_fraction": 0.2})
    fetch(cfg)
    manifest = write_shards(cfg)
    assert manifest["raw"]["rejected"] == 1 and manifest["splits"]["train"]["count"] == 4
    listed = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    on_disk = sorted(p.name for p in Path(cfg.data.shards_dir).glob("train-*"))
    assert len(listed) == 4 and sorted(listed) == on_disk  # the empty one neither listed nor left behind
    assert all(s["count"] == 1 for s in manifest["splits"]["train"]["shards"])
