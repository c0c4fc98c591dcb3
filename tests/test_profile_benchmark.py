from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


def test_profile_json_schema(tmp_path, cli, exported):
    onnx_path = exported("segformer-b0-test")
    static = exported("vit-seg-tiny-test", dynamic_batch=False)
    r = cli("profile", str(onnx_path), str(static), "segformer-b0-test", "--batch-sizes", "1,2", "--iters", "3",
            "--warmup", "1", "--threads", "1", "--report", str(tmp_path / "p.json"))
    assert r.exit_code == 0, r.stderr
    results = json.loads((tmp_path / "p.json").read_text())
    assert [x["backend"] for x in results] == ["onnxruntime", "onnxruntime", "torch"]
    for x in results:
        assert {"model", "backend", "device", "precision", "image_size", "file_size_mb", "params", "gflops", "batches",
                "environment"} <= set(x)
        assert x["gflops"] > 0 and x["params"] > 0
        assert x["environment"]["cpu"]["cores"] >= 1 and x["environment"]["onnxruntime_version"]
    onnx_rows, static_rows, torch_rows = (x["batches"] for x in results)
    for row in onnx_rows + torch_rows:
        assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s", "peak_rss_mb", "batch"} <= set(row)
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["images_per_s"] > 0
    assert static_rows[1]["skipped"].startswith("static batch")
    # ONNX and torch count the same convolutions and matmuls (fold removes the decoder's fuse conv)
    assert results[0]["gflops"] < results[2]["gflops"]
    bad = cli("profile", str(onnx_path), "--batch-sizes", "0")
    assert bad.exit_code == 2 and "integers in 1..1024" in bad.stderr


def test_benchmark_schema_and_files(tmp_path, cli, monkeypatch):
    from vitseg_export.cli import common

    monkeypatch.setattr(common.console, "width", 80)  # a piped log: every column must fit, nothing cut
    r = cli("benchmark", "vit-seg-tiny-test", "--output", str(tmp_path / "b"), "--formats", "onnx", "--precisions", "fp32,int8", "--allow-float-fallback",
            "--num-images", "2", "--iters", "3", "--calib", "synthetic[:4]")
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert {"checkpoint", "architecture", "image_size", "device", "batch", "rows", "environment"} <= set(report)
    names = [row["name"] for row in report["rows"]]
    assert names == ["pytorch-eager-fp32", "onnx-fp32", "onnx-int8"]
    for row in report["rows"]:
        assert {"name", "format", "precision", "status", "latency_p50_ms", "speedup", "pixel_agreement"} <= set(row)
    # the row's share is its artifact's (read back from the manifest), and attention's float MACs keep it below 1
    int8_manifest = json.loads(Path(report["rows"][2]["path"] + ".json").read_text())
    assert report["rows"][2]["int8_mac_share"] == int8_manifest["int8"]["int8_mac_share"] < 1
    speed = report["rows"][2]["speed_vs_baseline"]  # int8 against onnx-fp32, interleaved, by the timing rule
    assert speed["baseline"] == "fp32" and speed["candidate"] == "int8" and speed["pairs"] >= 21
    # the outcome by hand from the recorded interval (the rule: all of it past 1 +- margin), not from the run's own word
    low, high, margin = speed["low"], speed["high"], speed["margin"]
    by_hand = "faster" if low > 1 + margin else "slower" if high < 1 - margin else "no measurable gain"
    assert speed["outcome"] == by_hand and low <= speed["speedup"] <= high and margin == 0.1
    assert report["rows"][2]["status"] == {"slower": "verified, slower than fp32 here", "faster": "verified",
                                           "no measurable gain": "verified, no measurable gain over fp32 here"}[by_hand]
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert "| onnx-int8 |" in md and "speedup" in md
    assert (tmp_path / "b" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in r.stdout.splitlines() if not line.startswith("wrote ")]  # the table
    assert all(len(line) <= 80 for line in lines) and any("speedup" in line for line in lines)
    for name in names:  # each row's name and its speedup on one line
        assert any(line.startswith(name) and re.search(r"\d+\.\d\dx$", line.rstrip()) for line in lines), r.stdout


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_benchmark_cell_failure_does_not_stop_the_others(tmp_path, cli):
    """A cell that fails (here: a format this machine cannot make, asked of the library) is recorded and the
    others go on; the CLI refuses a format asked for by name that is not available, before any work."""
    import importlib.util

    from vitseg_export.measure.benchmark import BenchmarkSettings, run_benchmark

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: its cells would not fail")
    report = run_benchmark("vit-seg-tiny-test", tmp_path / "b", BenchmarkSettings(
        formats=("trt", "onnx"), precisions=("fp32",), verify_images=2, iters=2))
    rows = {row.name: row for row in report.rows}
    assert rows["trt-fp32"].status.startswith("failed: TensorRT is not available")
    assert rows["onnx-fp32"].status == "verified"
    r = cli("benchmark", "vit-seg-tiny-test", "--output", str(tmp_path / "c"), "--formats", "trt,onnx")
    assert r.exit_code == 2 and "TensorRT is not available" in r.stderr and not (tmp_path / "c").exists()


def test_benchmark_with_pruned_variants(tmp_path, cli):
    r = cli("benchmark", "segformer-b0-test", "--output", str(tmp_path / "b"), "--formats", "onnx", "--precisions", "fp32",
            "--prune", "0.5", "--num-images", "2", "--iters", "2")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads((tmp_path / "b" / "benchmark.json").read_text())["rows"]}
    assert set(rows) == {"pytorch-eager-fp32", "onnx-fp32", "onnx-fp32-pruned0.5"}
    pruned = rows["onnx-fp32-pruned0.5"]
    assert pruned["status"] == "verified" and pruned["params"] < rows["onnx-fp32"]["params"]
    assert pruned["miou_drop_vs_labels"] is not None
    assert (tmp_path / "b" / "pruned-0.5" / "config.json").is_file()
