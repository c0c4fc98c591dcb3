from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.export.trt_lint import lint_for_tensorrt
from vitseg_export.settings import Int8Settings

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing; TensorRT is installed here")
def test_trt_without_tensorrt_fails_fast_with_one_line(tmp_path, cli):
    r = cli("export", "segformer-b0-test", "--format", "trt", "-o", str(tmp_path / "m.engine"))
    assert r.exit_code == 2 and "TensorRT is not available here" in r.stderr
    # one line: no progress line ("exporting ... to ONNX") came before it, so nothing was exported (counted, not timed)
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1
    assert not list(tmp_path.iterdir())


def _graph(nodes, inits=(), opset=17, inputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", opset)])


def test_lint_flags_what_the_tensorrt_parser_rejects():
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    cubic = _graph([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")], [scales])
    assert [p.reason for p in lint_for_tensorrt(cubic)] == ["mode 'cubic' (TensorRT: nearest or linear)"]
    aa = _graph([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="linear", antialias=1)], [scales])
    assert "antialias" in lint_for_tensorrt(aa)[0].reason
    custom = _graph([helper.make_node("FancyOp", ["x"], ["y"], name="f", domain="com.example")])
    assert "plugin" in lint_for_tensorrt(custom)[0].reason
    unknown = _graph([helper.make_node("Col2Im", ["x"], ["y"], name="c")])
    assert "not in the TensorRT ONNX parser's supported operators" in lint_for_tensorrt(unknown)[0].reason
    zp = helper.make_tensor("zp", TensorProto.INT8, [], [3])
    sc = helper.make_tensor("sc", TensorProto.FLOAT, [], [0.1])
    q = _graph([helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["y"], name="q")], [zp, sc])
    assert "zero point must be 0" in lint_for_tensorrt(q)[0].reason
    bias = helper.make_tensor("b", TensorProto.INT32, [3], [1, 2, 3])
    zp32 = helper.make_tensor("zp32", TensorProto.INT32, [], [0])
    dq = _graph([helper.make_node("DequantizeLinear", ["b", "sc", "zp32"], ["y"], name="dq")], [bias, sc, zp32])
    assert "int32" in lint_for_tensorrt(dq)[0].reason
    attention = _graph([helper.make_node("Attention", ["x", "x", "x"], ["y"], name="a")], opset=23)
    assert "10.14" in lint_for_tensorrt(attention)[0].reason


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vitseg_graphs_lint_clean(tmp_path, twin, precision):
    for name in ("segformer-b2-test", "vit-seg-base-test"):
        result = export_onnx(twin(name), tmp_path / f"{name}.onnx",
                             OnnxExportSettings(precision=precision, outputs="both", dynamic_size=name.startswith("seg")))
        assert lint_for_tensorrt(result.model_proto) == [], name


def test_int8_trt_target_lints_clean_without_dead_nodes(tmp_path, twin):
    kw = dict(calib="synthetic[:4]", calib_images=4, heldout="synthetic[:4]", allow_float_fallback=True)
    trt_q = export_onnx(twin("segformer-b0-test"), tmp_path / "t.onnx", OnnxExportSettings(precision="int8"),
                        int8=Int8Settings(target="trt", **kw))
    assert lint_for_tensorrt(trt_q.model_proto) == []
    assert trt_q.manifest.extra["graph"]["dead_nodes"] == 0 and trt_q.manifest.extra["graph"]["casts"] <= 5


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_build_run_verify(tmp_path, twin, precision):
    """Real TensorRT: build an engine from the exported ONNX, run it through the runner, verify it."""
    from vitseg_export.export.tensorrt_engine import EngineSettings, engine_from_onnx
    from vitseg_export.verdict.verify import verify_artifact

    onnx_path = tmp_path / f"m-{precision}.onnx"
    export_onnx(twin("segformer-b0-test"), onnx_path, OnnxExportSettings(precision=precision, outputs="both"),
                int8=Int8Settings(target="trt", calib="synthetic[:8]", calib_images=8, heldout="synthetic[:8]",
                                  allow_float_fallback=True))
    manifest = engine_from_onnx(onnx_path, tmp_path / f"m-{precision}.engine",
                                EngineSettings(workspace_gb=1, timing_cache=tmp_path / "timing.cache"))
    assert manifest.extra["tensorrt_version"] and (tmp_path / "timing.cache").is_file()
    # judged before it was written at every shape of its profile (default: batch 1..8 at 64x64)
    assert {s["batch"] for s in manifest.self_parity["shapes"]} == {1, 8}
    assert manifest.self_parity["batch_consistency"]["passed"] and manifest.self_parity["batch_consistency"]["images_compared"]
    report = verify_artifact(tmp_path / f"m-{precision}.engine", "segformer-b0-test", "synthetic[:4]", 4, device="cuda")
    assert report.passed, report.failures
    assert [(s["batch"], s["height"]) for s in report.to_json()["shapes"]] == [(1, 64), (8, 64)]
    onnx.load(onnx_path)  # the ONNX the engine came from stays beside it
    assert np.isfinite(report.summary.mean_abs_logit_diff)


def test_a_missing_cuda_driver_is_one_clear_error():
    from vitseg_export.errors import BackendMissingError, VitsegError
    from vitseg_export.runners.cuda import check, cuda_devices, runtime

    if cuda_devices():
        pytest.skip("a CUDA GPU and driver are present here: the no-driver message cannot be produced")
    with pytest.raises(BackendMissingError, match=r"CUDA is not usable here \(cudaError"):
        check(runtime().cudaGetDeviceCount())
    with pytest.raises(VitsegError):
        check(runtime().cudaMalloc(16))


@pytest.mark.parametrize("precision,target", [("fp32", "cpu"), ("fp16", "cpu"), ("int8", "cpu"), ("int8", "trt")])
def test_every_graph_kind_passes_polygraphy_lint(tmp_path, twin, precision, target):
    """An independent, NVIDIA-maintained static check (polygraphy check lint: faulty and dead nodes) beside
    vitseg's own parser lint, on every kind of graph vitseg exports."""
    path = tmp_path / f"{precision}-{target}.onnx"
    export_onnx(twin("segformer-b0-test"), path, OnnxExportSettings(precision=precision, outputs="both"),
                int8=Int8Settings(target=target, calib="synthetic[:4]", calib_images=4,
                                  min_agreement=0.0, min_miou_vs_reference=0.0, allow_float_fallback=True))
    polygraphy = Path(sys.executable).with_name("polygraphy")
    proc = subprocess.run([str(polygraphy), "check", "lint", str(path), "-o", str(tmp_path / "lint.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "lint.json").read_text())
    assert report["summary"]["failing"] == [] and report["lint_entries"] == [], report["lint_entries"][:3]
