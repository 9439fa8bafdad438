"""The throughput benchmark runs end to end at smoke size on CPU."""

import json

import pytest

from bench.throughput import format_table, main


@pytest.mark.timeout(300)
def test_bench_smoke_writes_table_and_json(tmp_path):
    report = main(["--smoke", "--out", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == report["rows"] and saved["device"] == "cpu"
    setups = {r["setup"] for r in report["rows"]}
    assert {"reference (PyTorch-VAE recipe, fp32)", "dfcvae train step", "data path (shards -> device)",
            "end to end from shards"} <= setups
    assert all("error" not in r and r["images_per_s"] > 0 for r in report["rows"]), report["rows"]
    assert all(r["flops_per_image"] > 0 for r in report["rows"] if r["setup"] == "dfcvae train step")
    assert "| setup |" in format_table(report)
