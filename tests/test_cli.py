from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

from vitseg_export.modeling import registry


def test_models_json_lists_every_architecture_with_its_facts(cli):
    result = cli("models", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    names = {r["name"] for r in rows}
    assert names == {a.name for a in registry.ARCHITECTURES.values() if a.tiny_twin_of is None}
    base = next(r for r in rows if r["name"] == "vit-seg-base")
    assert base == {**base, "family": "vit", "params": 86_284_806, "image_size": 128, "num_classes": 3}
    assert all(isinstance(r["params"], int) and r["params"] > 1_000_000 for r in rows)
    with_twins = json.loads(cli("models", "--json", "--include-test").stdout)
    assert len(with_twins) == 2 * len(rows)


def test_python_dash_m_entry_point_and_clean_errors():
    """The real process: `python -m vitseg_export`, exit code 2 and one line without a traceback."""
    proc = subprocess.run([sys.executable, "-m", "vitseg_export", "train", "--model", "segformer-b9",
                           "--output", "/tmp/never"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown architecture 'segformer-b9'" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "vitseg_export", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "train" in ok.stdout


def library_chatter(stderr: str) -> list[str]:
    """Log lines of Model Optimizer, NNCF or ONNX Runtime's quantizer in a command's stderr."""
    return [line for line in stderr.splitlines() if re.search(r"\[modelopt\]| - (INFO|WARNING|ERROR) - |^(INFO|WARNING):", line)]


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, cli):
    result = cli("demo", "--model", "segformer-b0-test", "--output", str(tmp_path / "demo"), "--epochs", "1",
                 "--train-images", "8", "--num-images", "2", "--image-size", "64")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "demo" / "benchmark.json").read_text())
    names = [r["name"] for r in report["rows"]]
    # bf16 is not an ONNX precision (ONNX Runtime's CPU provider has none): no onnx-bf16 row
    assert names[:4] == ["pytorch-eager-fp32", "onnx-fp32", "onnx-fp16", "onnx-int8"]
    if importlib.util.find_spec("openvino") is not None:  # the demo shows every format this machine can make
        assert names[4:] == ["openvino-fp32", "openvino-fp16", "openvino-bf16", "openvino-int8"]
    for row in report["rows"][1:]:
        if row["precision"] == "int8" and row["status"].startswith("skipped: "):
            # the demo's int8 rows are real or absent with the reason (the tiny model's int8 rarely pays on a CPU)
            assert row["path"] is None and row["latency_p50_ms"] is None and ("slower than fp32" in row["status"] or
                                                                             "of the MACs stayed int8" in row["status"]), row
            continue
        assert row["status"].startswith("verified") and row["latency_p50_ms"] > 0 and row["speedup"] > 0, row
    assert report["rows"][1]["pixel_agreement"] >= 0.9999
    assert (tmp_path / "demo" / "artifacts" / "segformer-b0-test-fp32.onnx.json").is_file()
    assert len(list((tmp_path / "demo" / "predictions").glob("*_mask.png"))) == 4
    int8_report = tmp_path / "demo" / "reports" / "verify-onnx-int8.json"
    assert int8_report.is_file() == report["rows"][3]["status"].startswith("verified")
    if int8_report.is_file():
        assert json.loads(int8_report.read_text())["precision"] == "int8"
    for name in ("benchmark.md", "pareto.png", "overlays.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    assert "onnx-int8" in result.stdout and "verified" in result.stdout and "Traceback" not in result.stderr
    assert not library_chatter(result.stderr), library_chatter(result.stderr)  # only with vitseg --verbose


def test_export_json_stdout_is_only_the_manifest_with_every_converter(tmp_path):
    """Model Optimizer (fp16 AutoCast, int8 --target trt) and NNCF (OpenVINO int8) log and draw progress on
    stdout by themselves: `--json` must still print nothing but the manifest there, and their log lines reach
    stderr only with `vitseg --verbose`."""
    int8 = ["--precision", "int8", "--calib-images", "8", "--allow-float-fallback"]
    cases = [("fp16", "onnx", ["--precision", "fp16"]), ("int8-trt", "onnx", [*int8, "--target", "trt"])]
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        cases.append(("int8-ov", "xml", ["--format", "openvino", *int8]))
    for name, suffix, args in cases:
        out = tmp_path / f"{name}.{suffix}"
        proc = subprocess.run([sys.executable, "-m", "vitseg_export", "export", "segformer-b0-test", *args,
                               "--json", "-o", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads(proc.stdout)  # fails on any stray line
        assert manifest["artifact"] == out.name, name
        # and their INFO / WARNING chatter stays out of stderr unless --verbose asks for it (AutoCast printed ~100
        # INFO lines per fp16 export, and warnings configured at its import, such as "Did not find  in value
        # info map")
        assert not library_chatter(proc.stderr), (name, library_chatter(proc.stderr))
    # --verbose lets the libraries log at their own levels
    proc = subprocess.run([sys.executable, "-m", "vitseg_export", "--verbose", "export", "segformer-b0-test",
                           "--precision", "fp16", "-o", str(tmp_path / "verbose.onnx")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[modelopt\]\[onnx\] - INFO - ", proc.stderr), proc.stderr[-2000:]
