"""int8 for a CPU class: the class is chosen and recorded, saturation-safe weights by default, a warning where
an artifact runs on a class it is not exact on, the pre-calibration probe, and the refusal of an "int8" that
would be float in all but name."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

from vitseg_export import cpu
from vitseg_export.errors import Int8NotWorthIt
from vitseg_export.export import int8_probe
from vitseg_export.export.int8 import ort_layer_runner
from vitseg_export.export.onnx_export import export_onnx
from vitseg_export.export.settings import Int8Settings, OnnxExportSettings
from vitseg_export.runners import base, runner_for

HERE = cpu.cpu_class()


@pytest.mark.parametrize("flags,expected", [
    ({"sse4_2"}, "other"), ({"avx2", "fma"}, "avx2"), ({"avx2", "avx512f"}, "avx2"),
    ({"avx2", "avx512f", "avx512_vnni"}, "vnni"), ({"avx2", "avx_vnni"}, "vnni"),
    ({"avx2", "avx512_vnni", "amx_tile", "amx_int8"}, "amx")])
def test_cpu_class_from_flags(flags, expected):
    assert cpu.cpu_class(flags) == expected


def test_saturation_safe_int8_is_exact_everywhere_and_8_bit_only_with_vnni_or_amx():
    assert cpu.classes_exact_for("avx2") == ["avx2", "vnni", "amx"]
    assert cpu.classes_exact_for("vnni") == ["vnni", "amx"] == cpu.classes_exact_for("amx")
    assert cpu.cpu_info()["class"] == HERE


def _export(tmp_path, twin, name, **kw):
    settings = Int8Settings(calib="synthetic[:8]", calib_images=8, heldout_images=4, **kw)
    path = tmp_path / f"{name}.onnx"
    return path, export_onnx(twin("vit-seg-tiny-test"), path, OnnxExportSettings(precision="int8"), int8=settings)


def _max_weight(path) -> int:
    """The largest |int8| weight in a Q/DQ graph: 7-bit (reduce_range) weights stay within 64."""
    model = onnx.load(path)
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return max(int(np.abs(onnx.numpy_helper.to_array(i).astype(np.int32)).max()) for i in model.graph.initializer
               if i.name in dq_inputs and i.data_type == onnx.TensorProto.INT8)


@pytest.mark.parametrize("made_for", ["avx2", "vnni"])
def test_the_cpu_class_is_chosen_recorded_and_shapes_the_weights(tmp_path, twin, made_for):
    path, result = _export(tmp_path, twin, made_for, cpu_class=made_for, allow_float_fallback=True)
    q = result.manifest.precision_details
    assert q["cpu_class"] == made_for and q["exact_on"] == cpu.classes_exact_for(made_for) and q["verified_on"] == HERE
    assert q["verdict_holds_on"] == (q["exact_on"] if HERE in q["exact_on"] else [HERE])
    assert q["quantization"]["weight_type"].startswith("7-bit" if made_for == "avx2" else "8-bit")
    assert q["quantization"]["depthwise_convs"].startswith("float")
    assert (_max_weight(path) <= 64) == (made_for == "avx2")  # 8-bit weights use the full range
    assert result.manifest.metadata["cpu_class"] == made_for
    assert {p.key: p.value for p in onnx.load(path).metadata_props}["vitseg.cpu_class"] == f'"{made_for}"'  # in the graph
    if HERE == made_for:  # probed before calibrating, and timed against fp32, on the class it is for
        assert set(q["int8_probe"]["ops"]) == set(int8_probe.DECIDING) and q["speed_here"]["judged"]
        assert q["speed_here"]["fp32_ms"] > 0 and q["speed_here"]["int8_ms"] > 0
    else:
        assert isinstance(q["int8_probe"], str) and q["int8_probe"].startswith("not run")
    with runner_for(path) as runner:
        assert runner.info.cpu_class == made_for


def test_a_runner_warns_on_a_cpu_class_the_artifact_is_not_exact_on(tmp_path, twin, monkeypatch):
    path, _ = _export(tmp_path, twin, "vnni", cpu_class="vnni", allow_float_fallback=True)
    monkeypatch.setattr(base, "cpu_class", lambda: "avx2")  # as on a CPU without VNNI
    with pytest.warns(UserWarning, match="made for vnni CPUs.*this CPU is avx2.*--cpu-class avx2"):
        runner_for(path).activate().deactivate()
    monkeypatch.setattr(base, "cpu_class", lambda: "amx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact there: no warning
        runner_for(path).activate().deactivate()


def test_a_mostly_float_int8_is_refused_and_nothing_is_written(tmp_path, cli):
    """Agreement 100% is reached only with every layer back in float: the "int8" would be an fp32 model."""
    out = tmp_path / "out" / "q.onnx"
    args = ["export", "vit-seg-tiny-test", "--precision", "int8", "--calib", "synthetic[:8]", "--calib-images", "8",
            "--min-agreement", "1.0", "-o", str(out)]
    r = cli(*args)
    assert r.exit_code == 3 and "of the MACs stayed int8" in r.stderr and "vitseg qat" in r.stderr, r.stderr
    assert r.stderr.count("error:") == 1 and r.stderr.strip().splitlines()[-1].startswith("error: only ")
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    ok = cli(*args, "--allow-float-fallback")
    assert ok.exit_code == 0, ok.stderr
    assert "mostly float" in ok.stdout and json.loads(out.with_suffix(".onnx.json").read_text())["int8"]["int8_mac_share"] < 0.5


def test_the_probe_times_each_op_type_and_refuses_only_when_int8_loses_everywhere():
    record = int8_probe.time_layers(ort_layer_runner, "onnxruntime", HERE if HERE in cpu.CPU_CLASSES else "avx2")
    assert set(record["ops"]) == set(int8_probe.PROBE_LAYERS) and record["cpu_class"] == HERE
    for row in record["ops"].values():
        assert row["fp32_ms"] > 0 and row["int8_ms"] > 0 and row["speedup"] == pytest.approx(row["fp32_ms"] / row["int8_ms"], rel=1e-2)
    slow = {"cpu_class": "avx2", "runtime": "openvino", "ops": {"matmul": {"speedup": 0.85}, "conv1x1": {"speedup": 0.9},
                                                                 "dwconv3x3": {"speedup": 1.5}}}
    assert "this avx2 CPU in openvino" in int8_probe.refusal(slow) and "matmul 0.85x" in int8_probe.refusal(slow)
    slow["ops"]["conv1x1"]["speedup"] = 1.2  # one of the MAC-heavy op types pays: calibrate and measure the whole
    assert int8_probe.refusal(slow) is None


def test_the_probe_runs_only_on_the_class_the_int8_is_for(monkeypatch):
    other = "vnni" if HERE == "avx2" else "avx2"
    assert int8_probe.check_int8_pays(Int8Settings(cpu_class=other), ort_layer_runner, "onnxruntime") is None
    monkeypatch.setattr(int8_probe, "time_layers", lambda compile_fn, runtime, made_for, ops: {
        "cpu_class": HERE, "runtime": runtime, "made_for": made_for, "ops": {op: {"speedup": 0.5} for op in ops}})
    with pytest.raises(Int8NotWorthIt, match="cannot pay") as refused:
        int8_probe.check_int8_pays(Int8Settings(cpu_class=HERE), ort_layer_runner, "onnxruntime")
    assert "--cpu-class vnni" in refused.value.hint and "--allow-float-fallback" in refused.value.hint
    allowed = int8_probe.check_int8_pays(Int8Settings(cpu_class=HERE, allow_float_fallback=True), ort_layer_runner, "onnxruntime")
    assert allowed["ops"]["matmul"]["speedup"] == 0.5


@pytest.mark.parametrize("args,message", [
    (["--precision", "int8", "--cpu-class", "avx9"], "--cpu-class avx9 is unknown"),
    (["--precision", "fp32", "--cpu-class", "vnni"], "--cpu-class applies to --precision int8 for CPUs"),
    (["--precision", "int8", "--target", "trt", "--cpu-class", "vnni"], "not --format onnx --precision int8 --target trt"),
    (["--precision", "fp16", "--allow-float-fallback"], "--allow-float-fallback applies to --precision int8 only")])
def test_cpu_class_options_that_do_not_apply_are_refused(tmp_path, cli, args, message):
    r = cli("export", "vit-seg-tiny-test", *args, "-o", str(tmp_path / "m.onnx"))
    assert r.exit_code == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_the_benchmark_shows_a_refused_int8_as_skipped_with_the_reason(tmp_path, monkeypatch):
    import dataclasses

    from vitseg_export import benchmark
    from vitseg_export.formats import get_format

    real = get_format("onnx")

    def export(loaded, path, request, progress):
        if request.precision == "int8":  # what the probe says on a CPU where int8 loses (an AVX2-only EPYC)
            raise Int8NotWorthIt("int8 cannot pay on this avx2 CPU in onnxruntime", "export fp32")
        return real.export(loaded, path, request, progress)

    monkeypatch.setattr(benchmark, "get_format", lambda name: dataclasses.replace(real, export=export))
    report = benchmark.run_benchmark("vit-seg-tiny-test", tmp_path / "b", benchmark.BenchmarkSettings(
        formats=("onnx",), precisions=("fp32", "int8"), verify_images=2, iters=2), log=lambda m: None)
    row = report.row("onnx-int8")
    assert row.status == "skipped: int8 cannot pay on this avx2 CPU in onnxruntime" and not row.failed
    assert row.latency_p50_ms is None and report.row("onnx-fp32").status == "verified"
    assert "skipped: int8 cannot pay" in (tmp_path / "b" / "benchmark.md").read_text()
