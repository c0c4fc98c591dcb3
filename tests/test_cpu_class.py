"""int8 for a CPU class: the class is chosen and recorded, saturation-safe weights by default, int8 emulated (and a
warning) where an artifact runs on a class whose integer kernels would saturate it, the speed decision before
calibrating, and the refusal of an "int8" that would be float in all but name. Each test forces the classes it
is about (`cpu_class_is`); none depends on the class of the machine it runs on."""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from vitseg_export.compare.inputs import load_inputs
from vitseg_export.errors import Int8NotWorthIt
from vitseg_export.export import int8_probe
from vitseg_export.export.int8 import ort_layer_runner
from vitseg_export.export.onnx_export import export_onnx
from vitseg_export.machine import cpu, timing
from vitseg_export.runners import base, runner_for
from vitseg_export.runners.onnxruntime_runner import session_options
from vitseg_export.settings import Int8Settings, OnnxExportSettings

HERE = cpu.cpu_class()


@pytest.mark.parametrize("flags,expected", [
    ({"sse4_2"}, "other"), ({"avx2", "fma"}, "avx2"), ({"avx2", "avx512f"}, "avx2"),
    ({"avx2", "avx512f", "avx512_vnni"}, "vnni"), ({"avx2", "avx_vnni"}, "vnni"),
    ({"avx2", "avx512_vnni", "amx_tile", "amx_int8"}, "amx")])
def test_cpu_class_from_flags(flags, expected):
    assert cpu.cpu_class(flags) == expected


@pytest.mark.parametrize("flags,machine,expected", [
    (set(), "aarch64", "arm"), (set(), "arm64", "arm"), (set(), "x86_64", "unknown"), (set(), "AMD64", "unknown"),
    ({"sse4_2"}, "x86_64", "other"), ({"avx2", "avx512vnni"}, "AMD64", "vnni")])  # py-cpuinfo's spelling on Windows
def test_cpu_class_on_other_machines(flags, machine, expected):
    assert cpu.cpu_class(flags, machine) == expected


def test_cpuid_through_py_cpuinfo_gives_the_class_proc_cpuinfo_gives():
    """Where there is no /proc/cpuinfo (macOS, Windows) the flags come from py-cpuinfo's CPUID: on this machine both
    readings must name the same class."""
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo here to compare py-cpuinfo's reading with")
    cpu._CPUID_FLAGS.clear()
    assert cpu.cpu_class(cpu._flags_from_cpuid()) == cpu.cpu_class(cpu.cpu_flags()) != "unknown"


def test_an_unknown_class_is_the_safe_class_with_one_warning_never_exact_for_8_bit(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: set())
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "_WARNED", [])
    with pytest.warns(UserWarning, match="treats it as the avx2 class") as warned:
        assert not cpu.int8_exact_here("vnni") and not cpu.int8_exact_here("")  # 8-bit weights: emulated
        assert cpu.int8_exact_here("avx2")  # saturation-safe int8: exact on every x86 CPU
    assert len(warned) == 1
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert cpu.cpu_class() == "arm" and cpu.int8_exact_here("vnni")  # ARM accumulates in int32


def test_saturation_safe_int8_is_exact_everywhere_and_8_bit_only_with_vnni_or_amx():
    assert cpu.classes_exact_for("avx2") == ["avx2", "vnni", "amx"]
    assert cpu.classes_exact_for("vnni") == ["vnni", "amx"] == cpu.classes_exact_for("amx")
    assert cpu.cpu_info()["class"] == HERE


@pytest.mark.parametrize("here,made_for,exact", [
    ("avx2", "avx2", True), ("avx2", "vnni", False), ("avx2", "", False), ("vnni", "vnni", True), ("vnni", "avx2", True),
    ("vnni", "", True), ("amx", "vnni", True)])
def test_int8_is_exact_everywhere_but_8_bit_weights_on_avx2(cpu_class_is, here, made_for, exact):
    cpu_class_is(here)  # "": int8 of no class (the TensorRT target's 8-bit graphs)
    assert cpu.int8_exact_here(made_for) is exact


def _export(tmp_path, twin, name, **kw):
    settings = Int8Settings(calib="synthetic[:8]", calib_images=8, **kw)
    path = tmp_path / f"{name}.onnx"
    return path, export_onnx(twin("vit-seg-tiny-test"), path, OnnxExportSettings(precision="int8"), int8=settings)


def _max_weight(path) -> int:
    """The largest |int8| weight in a Q/DQ graph: 7-bit (reduce_range) weights stay within 64."""
    model = onnx.load(path)
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return max(int(np.abs(onnx.numpy_helper.to_array(i).astype(np.int32)).max()) for i in model.graph.initializer
               if i.name in dq_inputs and i.data_type == onnx.TensorProto.INT8)


@pytest.mark.parametrize("made_for,here", [("avx2", "avx2"), ("avx2", "vnni"), ("vnni", "avx2"), ("vnni", "vnni")])
def test_the_cpu_class_is_chosen_recorded_and_shapes_the_weights(tmp_path, twin, cpu_class_is, made_for, here):
    """Every pairing of the class an int8 is made for and the class it is exported on, forced: the weights, the
    record, whether its arithmetic is emulated and whether its speed is judged follow the pair."""
    if (made_for, here) == ("vnni", "vnni") and HERE == "avx2":
        pytest.skip("8-bit int8 runs in integer kernels only where the CPU has VNNI: forcing vnni on this avx2 CPU "
                    "would let them saturate (the (vnni, avx2) case covers this CPU)")
    cpu_class_is(here)
    path, result = _export(tmp_path, twin, made_for, cpu_class=made_for, allow_float_fallback=True)
    q = result.manifest.precision_details
    exact = not (here == "avx2" and made_for == "vnni")
    assert q["cpu_class"] == made_for and q["exact_on"] == cpu.classes_exact_for(made_for) == q["verdict_holds_on"]
    assert q["verified_on"] == here and q["verified_with"] == ("integer kernels" if exact else "int8 emulated in float (exact)")
    assert q["quantization"]["weight_type"].startswith("7-bit" if made_for == "avx2" else "8-bit")
    assert q["quantization"]["depthwise_convs"].startswith("float")
    assert (_max_weight(path) <= 64) == (made_for == "avx2")  # 8-bit weights use the full range, and stayed int8
    assert result.manifest.metadata["cpu_class"] == made_for
    assert {p.key: p.value for p in onnx.load(path).metadata_props}["vitseg.cpu_class"] == f'"{made_for}"'  # in the graph
    before = q["speed_decision"]["before_calibration"]
    if exact:  # timed before calibrating, by the interleaved rule; judged on the class it is made for only
        assert before["stage"] == "before calibration" and before["judged"] == (here == made_for)
        assert before["pairs"] >= timing.MIN_PAIRS and before["outcome"] == timing.outcome(before["low"], before["high"])
        assert before["low"] <= before["speedup"] <= before["high"] and before["margin"] == timing.MARGIN
    else:
        assert before == f"not timed: int8 made for vnni is not exact on this {here} CPU"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with runner_for(path) as runner:
            assert runner.info.cpu_class == made_for and runner.int8_emulated == (not exact)
    assert any("emulated in float" in str(w.message) for w in caught) == (not exact)


def test_a_runner_emulates_int8_its_cpu_would_saturate_and_says_so(tmp_path, twin, cpu_class_is):
    cpu_class_is("avx2")  # as on a CPU without VNNI (exact on any CPU: the 8-bit int8 is emulated)
    path, _ = _export(tmp_path, twin, "vnni", cpu_class="vnni", allow_float_fallback=True)
    with pytest.warns(UserWarning, match="made for vnni CPUs.*this CPU is avx2.*emulated in float.*--cpu-class avx2"):
        runner = runner_for(path).activate()
    pixels = np.random.default_rng(0).random((2, 3, *runner.image_size), dtype=np.float32)
    assert runner.int8_emulated
    emulated = ort.InferenceSession(str(path), session_options(emulate_int8=True), providers=["CPUExecutionProvider"])
    assert np.array_equal(runner.infer({"pixels": pixels})["logits"], emulated.run(None, {"pixels": pixels})[0])
    runner.deactivate()
    cpu_class_is("amx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact there: no warning, integer kernels
        assert not runner_for(path).activate().int8_emulated


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


def test_the_probe_times_each_op_type_by_the_interleaved_rule():
    record = int8_probe.time_layers(ort_layer_runner, "onnxruntime", "avx2")
    assert set(record["ops"]) == set(int8_probe.PROBE_LAYERS) and record["cpu_class"] == HERE
    for row in record["ops"].values():
        assert row["baseline_ms"] > 0 and row["candidate_ms"] > 0 and row["pairs"] >= timing.MIN_PAIRS
        assert row["low"] <= row["speedup"] <= row["high"] and row["outcome"] == timing.outcome(row["low"], row["high"])


class _Idle(base.Runner):
    """A runner that does nothing: speed_decision's timing is replaced in these tests."""

    backend = "idle"

    def activate_impl(self) -> None:
        pass

    def infer_impl(self, pixels):
        return {}


def _comparison(outcome: str) -> timing.SpeedComparison:
    low, high = {timing.SLOWER: (0.7, 0.8), timing.NO_GAIN: (0.95, 1.02), timing.FASTER: (1.3, 1.5)}[outcome]
    return timing.SpeedComparison("fp32", "int8", 10.0, 10.0 / low, low + (high - low) / 2, low, high, 0.95, 0.1, 21, outcome)


def test_the_speed_decision_is_judged_only_on_the_class_the_int8_is_for(monkeypatch, cpu_class_is):
    monkeypatch.setattr(int8_probe, "compare_speed", lambda *a, **k: _comparison(timing.SLOWER))
    decide = lambda settings: int8_probe.speed_decision(_Idle("a", "cpu"), _Idle("b", "cpu"), (32, 32), settings,  # noqa: E731
                                                        "before calibration")
    cpu_class_is("avx2")
    assert int8_probe.not_timed_here(Int8Settings(cpu_class="vnni")) == "not timed: int8 made for vnni is not exact on this avx2 CPU"
    with pytest.raises(Int8NotWorthIt, match="slower than fp32 on this avx2 CPU it is made for .before calibration.: "
                                             "int8 0.75x fp32 .95% interval 0.70-0.80 over 21 pairs.*slower .the "
                                             "interval lies below 0.90.") as refused:
        decide(Int8Settings(cpu_class="avx2"))
    assert "--cpu-class vnni" in refused.value.hint and "--allow-float-fallback" in refused.value.hint
    allowed = decide(Int8Settings(cpu_class="avx2", allow_float_fallback=True))
    assert allowed["judged"] and allowed["outcome"] == timing.SLOWER
    cpu_class_is("vnni")  # avx2 int8 on a vnni CPU: exact, timed, not judged (says nothing about an avx2 CPU's speed)
    assert int8_probe.not_timed_here(Int8Settings(cpu_class="avx2")) is None
    assert not decide(Int8Settings(cpu_class="avx2"))["judged"]
    for outcome in (timing.NO_GAIN, timing.FASTER):  # only a measurably slower int8 is refused
        monkeypatch.setattr(int8_probe, "compare_speed", lambda *a, outcome=outcome, **k: _comparison(outcome))
        assert decide(Int8Settings(cpu_class="vnni"))["outcome"] == outcome


def test_a_refusal_comes_before_calibration(tmp_path, twin, cpu_class_is, monkeypatch):
    """int8 that cannot pay is refused from the graph with placeholder ranges: nothing is calibrated, nothing
    written (an int8 graph's speed does not depend on its ranges)."""
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the package's `quantize` is a function
    cpu_class_is("avx2")
    monkeypatch.setattr(int8_probe, "compare_speed", lambda *a, **k: _comparison(timing.SLOWER))
    monkeypatch.setattr(ort_quantize, "create_calibrator", lambda *a, **k: pytest.fail("calibrated before the refusal"))
    with pytest.raises(Int8NotWorthIt, match="before calibration"):
        _export(tmp_path, twin, "refused", cpu_class="avx2")
    assert not list(tmp_path.iterdir())


def test_the_placeholder_graph_is_the_calibrated_graphs_placement(twin, exported, tmp_path):
    """What is timed before calibrating is what is shipped: the same nodes quantized, the same Q/DQ structure."""
    from vitseg_export.export.int8 import _OrtQuantizer, quantized_layers

    model = onnx.load(exported("segformer-b0-test"))
    quantizer = _OrtQuantizer(model, Int8Settings(), tmp_path)
    placeholder = quantizer.placeholder()
    calibrated = quantizer(load_inputs("synthetic[:4]", "calib", 4, (64, 64)), tmp_path / "ranges.json")
    assert quantized_layers(placeholder) == quantized_layers(calibrated) and quantized_layers(placeholder)
    assert [n.op_type for n in placeholder.graph.node] == [n.op_type for n in calibrated.graph.node]


@pytest.mark.parametrize("args,message", [
    (["--precision", "int8", "--cpu-class", "avx9"], "Invalid value for '--cpu-class'"),
    (["--precision", "fp32", "--cpu-class", "vnni"], "--cpu-class applies to --precision int8 --target cpu only"),
    (["--precision", "int8", "--target", "trt", "--cpu-class", "vnni"], "not --format onnx --precision int8 --target trt"),
    (["--precision", "fp16", "--allow-float-fallback"], "--allow-float-fallback applies to --precision int8 only")])
def test_cpu_class_options_that_do_not_apply_are_refused(tmp_path, cli, args, message):
    r = cli("export", "vit-seg-tiny-test", *args, "-o", str(tmp_path / "m.onnx"))
    assert r.exit_code == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_the_benchmark_shows_a_refused_int8_as_skipped_with_the_reason(tmp_path, monkeypatch):
    import dataclasses

    from vitseg_export.formats import get_format
    from vitseg_export.measure import benchmark

    real = get_format("onnx")

    def export(loaded, path, request, progress):
        if request.precision == "int8":  # what the probe says on a CPU where int8 loses (an AVX2-only EPYC)
            raise Int8NotWorthIt("int8 cannot pay on this avx2 CPU in onnxruntime", "export fp32")
        return real.export(loaded, path, request, progress)

    monkeypatch.setattr(benchmark, "get_format", lambda name: dataclasses.replace(real, export=export))
    report = benchmark.run_benchmark("vit-seg-tiny-test", tmp_path / "b", benchmark.BenchmarkSettings(
        formats=("onnx",), precisions=("fp32", "int8"), verify_images=2, iters=2), log=lambda m: None)
    row = report.row("onnx-int8")
    assert row.status == "skipped: int8 cannot pay on this avx2 CPU in onnxruntime (export fp32)" and not row.failed
    assert row.latency_p50_ms is None and report.row("onnx-fp32").status == "verified"
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert "| onnx-int8 | skipped [1] |" in md and "[1] onnx-int8: int8 cannot pay on this avx2 CPU in onnxruntime (export fp32)" in md


# Under QEMU's user-mode emulation with its Haswell CPU model (AVX2, FMA; no AVX-512, no VNNI) ONNX Runtime's and
# OpenVINO's own CPU detection picks their AVX2 integer kernels: a real AVX2-only CPU's int8 arithmetic, on any x86
# machine. The child runs the graphs the way vitseg's runners do (natively, and emulated).
AVX2_CHILD = r"""
import sys, numpy as np, onnxruntime as ort, openvino as ov
from vitseg_export.runners.onnxruntime_runner import session_options
from vitseg_export.runners.openvino_runner import compile_config
folder = sys.argv[1]
x = np.load(f"{folder}/x.npy")
out = {}
for bits in ("8", "7"):
    for emulate in (False, True):
        session = ort.InferenceSession(f"{folder}/q{bits}.onnx", session_options(emulate_int8=emulate),
                                       providers=["CPUExecutionProvider"])
        out[f"ort{bits}_{'emulated' if emulate else 'native'}"] = session.run(None, {"x": x})[0]
core = ov.Core()
out["capabilities"] = np.array(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
for emulate in (False, True):
    compiled = core.compile_model(core.read_model(f"{folder}/q8.onnx"), "CPU", compile_config(core, "CPU", "f32", None, emulate))
    out[f"ov8_{'emulated' if emulate else 'native'}"] = compiled(x)[0]
np.savez(f"{folder}/avx2.npz", **out)
"""


def _saturating_graphs(folder) -> np.ndarray:
    """A MatMul whose u8 x s8 pairs reach AVX2's int16 limit with 8-bit weights (large weights and activations),
    quantized as vitseg's --target cpu int8 is (symmetric, Q/DQ, per-tensor) with 8-bit (q8) and 7-bit (q7)
    weights; returns its input."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    k = 512
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "saturating",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, k])],
                              [numpy_helper.from_array(rng.uniform(-1, 1, (k, k)).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "f.onnx")
    x = rng.uniform(-3, 3, (1, 64, k)).astype(np.float32)

    class Reader:
        batches = [x]

        def get_next(self):
            return {"x": self.batches.pop()} if self.batches else None

    for bits in ("8", "7"):
        quantize_static(str(folder / "f.onnx"), str(folder / f"q{bits}.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        reduce_range=bits == "7", activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        Reader.batches = [x]
    np.save(folder / "x.npy", x)
    return x


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None,
                    reason="needs qemu-x86_64 on an x86_64 machine (Debian's qemu-user, which .ci/run installs) to run "
                           "the AVX2-only CPU class")
def test_int8_on_a_real_avx2_only_cpu_saturates_where_vitseg_emulates_it(tmp_path):
    """The mechanism behind the CPU classes, on real AVX2 kernels: 8-bit int8 saturates (ONNX Runtime and OpenVINO),
    7-bit int8 does not, and the emulation vitseg's runners switch to computes there what this machine computes."""
    x = _saturating_graphs(tmp_path)
    child = tmp_path / "child.py"
    child.write_text(AVX2_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, str(child), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    avx2 = np.load(tmp_path / "avx2.npz")
    assert "INT8" in avx2["capabilities"] and "BF16" not in avx2["capabilities"]  # OpenVINO saw an AVX2 CPU
    here = ort.InferenceSession(str(tmp_path / "q8.onnx"), session_options(emulate_int8=True),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    scale = float(np.abs(here).max())

    def off(a, b) -> float:
        return float(np.abs(a - b).max()) / scale

    assert off(avx2["ort8_native"], avx2["ort8_emulated"]) > 0.05  # 8-bit weights saturate on AVX2
    assert off(avx2["ov8_native"], avx2["ov8_emulated"]) > 0.05
    assert off(avx2["ort8_emulated"], here) < 1e-5  # emulated there = exact here
    assert off(avx2["ort7_native"], avx2["ort7_emulated"]) < 1e-5  # 7-bit (--cpu-class avx2) is exact on AVX2
    # OpenVINO's float FakeQuantize rounds its own way: near ONNX Runtime's exact answer, far from the saturated one
    assert off(avx2["ov8_emulated"], here) < 0.02
