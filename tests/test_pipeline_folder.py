"""End to end on the user's own photographs: a folder outside the repository, reproduced to a
champion, then retrained when photographs are added (tests/test_pipeline.py has the demo's repo;
the two files run on different test workers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.pipeline_repo import SMALL, _params, _registration, _run, _stale, copy_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def folder_repo(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """A repo whose data is a folder of photographs outside it, reproduced to a champion; and the
    photographs held back to be added later."""
    base = tmp_path_factory.mktemp("folder")
    photos, held = base / "photos", base / "held"
    _run([sys.executable, "-m", "bench.photos", "--out", str(photos), "--count", "100", "--size", "80"], ROOT)
    held.mkdir()
    added = []
    for path in sorted(photos.iterdir())[-25:]:
        added.append(held / path.name)
        path.rename(added[-1])
    root = base / "repo"
    copy_project(root)
    profile = yaml.safe_load((ROOT / "pipeline/demo.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in {
        **profile,
        **SMALL,
        "data.source": "folder",
        "data.folder_dir": str(photos),
        "data.image_size": 32,
        "model.hidden_channels": [8, 16],
        "model.latent_dim": 8,
        "tune.enabled": False,
        "eval.num_samples": 16,
        "eval.val_subset": 8,
    }.items():
        section, _, field = key.partition(".")
        params[section][field] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "project"], root)
    _run(["dvc", "repro"], root, timeout=1200)
    return root, photos, added


def test_retrain_on_new_images_trains_anew_reevaluates_the_champion_then_idles(folder_repo):
    root, photos, added = folder_repo
    first = _registration(root)
    assert first["decision"] == "promoted"
    assert "nothing to do" in _run([sys.executable, "-m", "pipeline.retrain"], root)
    manifest = json.loads((root / "data/shards/manifest.json").read_text())

    for path in added:  # new photographs in the user's folder, outside the repository
        path.rename(photos / path.name)
    out = _run([sys.executable, "-m", "pipeline.retrain"], root, timeout=1200)
    assert f"changed since the last fetch ({len(added)} added, 0 removed, 0 changed)" in out
    new_manifest = json.loads((root / "data/shards/manifest.json").read_text())
    assert (
        sum(s["count"] for s in new_manifest["splits"].values())
        == 100
        > sum(s["count"] for s in manifest["splits"].values())
    )
    # A new run on the new data, all its steps: not the old run resumed.
    steps = _params(root)["train"]["steps"]
    reports = [json.loads(line) for line in (root / "outputs/train/reports.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in reports) == steps and all(r["restored_from"] == 0 for r in reports)
    second = _registration(root)
    assert second["version"] == first["version"] + 1
    # The old champion was evaluated again on the new evaluation, and the decision follows those numbers.
    assert f"the champion was evaluated again like v{second['version']}" in second["reason"]
    assert second["champion_scored_again"] and second["champion_objective"] != first["challenger_objective"]
    # Promoted only on evidence: the bound of the paired difference below -registry.min_improvement.
    better = second["difference_interval"][1] < -second["min_improvement"]
    assert second["decision"] == ("promoted" if better else "kept")
    assert _stale(root) == set()
    assert "nothing to do" in _run([sys.executable, "-m", "pipeline.retrain"], root)
