"""OpenVINO: the IR format (fp32 / fp16 / int8 with vitseg's mask-metric fallback), its runner, and the
edge path that needs neither torch nor onnxruntime. Skipped, saying so, where openvino is not installed
(it is in the test extra)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openvino = pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install -e '.[openvino]')")

from vitseg_export.errors import VitsegError  # noqa: E402
from vitseg_export.export.openvino_export import export_openvino  # noqa: E402
from vitseg_export.runners import runner_for  # noqa: E402
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings  # noqa: E402
from vitseg_export.verdict.verify import verify_artifact  # noqa: E402

EDGE = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnxruntime", "onnx", "onnxscript", "safetensors"):
            raise ImportError(f"blocked import of {name}: the OpenVINO edge path must not need it")
sys.meta_path.insert(0, Block())
sys.argv = ["vitseg"] + sys.argv[1:]
from vitseg_export.cli import main
main()
"""


def test_fp32_and_fp16_ir_export_static_and_verify(tmp_path, cli):
    r = cli("export", "segformer-b0-test", "--format", "openvino", "-o", str(tmp_path / "m.xml"))
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "m.bin").is_file() and "static batch 1" in r.stdout
    manifest = json.loads((tmp_path / "m.xml.json").read_text())
    assert manifest["format"] == "openvino" and manifest["metadata"]["precision"] == "fp32"
    assert manifest["metadata"]["dynamic_batch"] is False  # static unless asked: OpenVINO runs static faster
    assert manifest["fp32"]["inference_precision"]["hint"] == "f32"
    rt = {e.tag: e.attrib["value"] for e in ET.parse(tmp_path / "m.xml").getroot().find("rt_info").find("vitseg")}
    assert json.loads(rt["class_names"]) == ["pet", "background", "border"] and json.loads(rt["image_size"]) == [64, 64]
    static = verify_artifact(tmp_path / "m.xml", "segformer-b0-test", "synthetic[:3]", 3)
    assert static.passed and [s["batch"] for s in static.to_json()["shapes"]] == [1]
    with runner_for(tmp_path / "m.xml") as runner:
        assert runner.backend == "openvino" and runner.image_size == (64, 64)
        with pytest.raises(VitsegError, match="static batch of 1"):
            runner.infer({"pixels": np.zeros((2, 3, 64, 64), np.float32)})
    r = cli("export", "segformer-b0-test", "--format", "openvino", "--precision", "fp16", "--dynamic-batch",
            "-o", str(tmp_path / "h.xml"))
    assert r.exit_code == 0, r.stderr
    h = json.loads((tmp_path / "h.xml.json").read_text())
    assert h["fp16"]["weights"] == "fp16 (compressed)" and h["metadata"]["dynamic_batch"] is True
    assert (tmp_path / "h.bin").stat().st_size < 0.6 * (tmp_path / "m.bin").stat().st_size
    dynamic = verify_artifact(tmp_path / "h.xml", "segformer-b0-test", "synthetic[:3]", 3).to_json()
    assert dynamic["passed"] and [s["batch"] for s in dynamic["shapes"]] == [1, 4, 8]
    assert dynamic["batch_consistency"]["passed"] and dynamic["batch_consistency"]["images_compared"] == 6  # 3 images at batches 4 and 8 against batch 1


def test_onnx_artifact_runs_on_the_openvino_backend(exported, cli):
    path = exported("vit-seg-tiny-test")
    r = cli("verify", str(path), "-r", "vit-seg-tiny-test", "--backend", "openvino", "--num-images", "2",
            "--data", "synthetic[:2]", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["backend"] == "openvino" and report["passed"]


def _int8(twin, tmp_path, dynamic_batch=False, **targets):
    request = ExportRequest("openvino", OnnxExportSettings(precision="int8", dynamic_batch=dynamic_batch),
                            Int8Settings(calib="synthetic[:8]", calib_images=8,
                                         **{"allow_float_fallback": True, **targets}))
    return export_openvino(twin("vit-seg-tiny-test"), tmp_path / "q.xml", request, lambda m: None)


def test_a_dynamic_batch_int8_ir_is_judged_inside_a_batch(tmp_path, twin):
    result = _int8(twin, tmp_path, dynamic_batch=True, min_agreement=0.0, min_miou_vs_reference=0.0)
    parity = result.manifest.self_parity
    assert [s["batch"] for s in parity["shapes"]] == [1, 4, 8]
    assert parity["batch_consistency"]["passed"] and parity["batch_consistency"]["images_compared"] >= 8
    report = verify_artifact(tmp_path / "q.xml", "vit-seg-tiny-test", "synthetic[:4]", 4).to_json()
    assert [s["batch"] for s in report["shapes"]] == [1, 4, 8] and report["batch_consistency"]["passed"]


def test_int8_records_layers_mac_share_and_provenance(tmp_path, twin):
    result = _int8(twin, tmp_path, min_agreement=0.0, min_miou_vs_reference=0.0)
    q = result.manifest.precision_details
    assert q["fallback_groups"] == [] and q["quantized_layers"] > 0
    assert 0.5 < q["int8_mac_share"] < 1  # attention's activation x activation products are float MACs
    assert q["calibration"]["source"].startswith("synthetic[:8] split=calib") and q["calibration"]["images"] == 8
    assert q["heldout"]["source"].startswith("synthetic[:8] split=val") and q["heldout"]["images"] == 8  # every val image (up to 32)
    from vitseg_export.runners.openvino_runner import openvino_core

    model = openvino_core().read_model(str(tmp_path / "q.xml"))
    ops = {op.get_type_name() for op in model.get_ordered_ops()}
    assert "FakeQuantize" in ops or "Convert" in ops  # int8 weights / quantizers are in the IR
    # demanding more than the fully quantized graph reaches forces layer groups back to float: unconditionally (a
    # random twin's int8 never agrees with fp32 on every pixel of 8 images: near-ties everywhere)
    reached = q["heldout_agreement"]
    assert reached < 1.0
    stricter = _int8(twin, tmp_path, min_agreement=min(1.0, reached + 1e-4), min_miou_vs_reference=0.0)
    s = stricter.manifest.precision_details
    assert s["fallback_groups"] and s["float_layers"] and s["heldout_agreement"] > reached
    assert s["int8_mac_share"] < q["int8_mac_share"]


def test_predict_with_an_ir_needs_neither_torch_nor_onnxruntime(tmp_path, cli):
    r = cli("export", "segformer-b0-test", "--format", "openvino", "--outputs", "mask", "-o", str(tmp_path / "m.xml"))
    assert r.exit_code == 0, r.stderr
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
    (tmp_path / "edge.py").write_text(EDGE)
    proc = subprocess.run([sys.executable, str(tmp_path / "edge.py"), "predict", str(tmp_path / "m.xml"), str(image),
                           "--output", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    mask = np.asarray(Image.open(io.BytesIO((tmp_path / "out" / "img_mask.png").read_bytes())))
    assert mask.shape == (50, 70) and mask.max() <= 2
    blocked = subprocess.run([sys.executable, str(tmp_path / "edge.py"), "export", "segformer-b0-test", "-o",
                              str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0 and "blocked import" in blocked.stderr  # the blocker is real


def test_without_openvino_the_format_is_one_line(tmp_path):
    block = EDGE.replace('("torch", "torchvision", "onnxruntime", "onnx", "onnxscript", "safetensors")', '("openvino",)')
    (tmp_path / "no_ov.py").write_text(block)
    proc = subprocess.run([sys.executable, str(tmp_path / "no_ov.py"), "export", "segformer-b0-test", "--format",
                           "openvino", "-o", str(tmp_path / "m.xml")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "openvino" in proc.stderr.lower()
    assert "pip install" in proc.stderr and not list(tmp_path.glob("m.*"))


def test_doctor_lists_openvino_and_its_devices(cli):
    doctor = json.loads(cli("doctor", "--json").stdout)
    assert doctor["formats"]["openvino"]["available"] and "cpu" in doctor["backends"]["openvino"]["devices"]
    # the bf16 flags decide what an int8 IR's float part computes in: they match the CPU's own flags
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert doctor["cpu"]["bf16_features"] == {f: f in flags for f in ("avx512_bf16", "amx_bf16")}
    has_bf16 = any(doctor["cpu"]["bf16_features"].values())
    assert has_bf16 != any("no bf16 arithmetic" in n for n in doctor["notes"])


def test_int8_keeps_depthwise_convolutions_float_and_counts_attention_macs(tmp_path, twin):
    """SegFormer's Mix-FFN depthwise convolutions never get quantizers (one per-tensor scale flattens their
    channel ranges: 65% agreement on a trained B0 at 512 px); the MAC share counts fused attention as float."""
    from vitseg_export.export.openvino_export import _layer_macs, ir_weight_layers

    request = ExportRequest("openvino", OnnxExportSettings(precision="int8", dynamic_batch=False),
                            Int8Settings(calib="synthetic[:8]", calib_images=8,
                                         min_agreement=0.0, min_miou_vs_reference=0.0, allow_float_fallback=True))
    result = export_openvino(twin("segformer-b0-test"), tmp_path / "s.xml", request, lambda m: None)
    q = result.manifest.precision_details
    assert q["float_op_types"] == ["GroupConvolution"] and q["fallback_groups"] == []
    assert q["inference_precision"]["hint"] == "bf16" and q["inference_precision"]["checked_with"] in ("bf16", "f32")
    model = openvino.Core().read_model(str(tmp_path / "s.xml"))
    layers, macs = ir_weight_layers(model), _layer_macs(model, (64, 64))
    depthwise = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "GroupConvolution"]
    assert depthwise and not any(layers[name] for name in depthwise)
    assert set(depthwise) <= set(q["float_layers"]) and q["quantized_layers"] > 0
    attention = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    assert attention and all(macs[name] > 0 and name not in layers for name in attention)
    # the share by a second method: ONNX Runtime's shapes of the fp32 ONNX graph the IR was converted from
    # (int8.node_macs), where every Conv/MatMul with a constant weight except the depthwise ones is int8 (nothing fell
    # back) and the activation x activation MatMuls (attention, fused by OpenVINO) are float
    import onnx

    from vitseg_export.export.int8 import node_macs
    from vitseg_export.export.onnx_export import export_onnx

    export_onnx(twin("segformer-b0-test"), tmp_path / "f.onnx", OnnxExportSettings(dynamic_batch=False))
    fp32 = onnx.load(tmp_path / "f.onnx")
    nodes = fp32.graph.node
    constants = {i.name for i in fp32.graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    depthwise = {n.name for n in nodes if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)}
    weighted = {n.name for n in nodes if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in constants}
    onnx_macs = node_macs(fp32, np.zeros((1, 3, 64, 64), np.float32))
    assert sum(onnx_macs.values()) == sum(macs.values())  # both readings count the same work
    expected = sum(m for name, m in onnx_macs.items() if name in weighted - depthwise) / sum(onnx_macs.values())
    assert q["int8_mac_share"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("capabilities, wanted, expected", [
    (["FP32", "BF16", "INT8"], "bf16", "bf16"), (["FP32", "INT8"], "bf16", "f32"), (["FP32", "BF16"], "f16", "f32"),
    (["FP32", "FP16"], "f16", "f16"), (["FP32", "BF16", "FP16"], "f32", "f32")])
def test_inference_precision_is_what_the_device_computes_in(capabilities, wanted, expected):
    from vitseg_export.runners.openvino_runner import inference_precision

    class Core:
        def get_property(self, device, name):
            assert name == "OPTIMIZATION_CAPABILITIES"
            return capabilities

    assert inference_precision(Core(), "CPU", wanted) == expected


def test_op_breakdown_compiles_an_ir_in_the_precision_it_runs_in(tmp_path, cli, monkeypatch):
    """The profiler's view of an IR must be the runner's: the precision its rt_info asks for, not always f32."""
    from vitseg_export.measure import profiling
    from vitseg_export.measure.profiling import openvino_op_breakdown
    from vitseg_export.runners import openvino_runner

    r = cli("export", "segformer-b0-test", "--format", "openvino", "--precision", "fp16", "-o", str(tmp_path / "h.xml"))
    assert r.exit_code == 0, r.stderr
    asked = []
    real = openvino_runner.inference_precision
    monkeypatch.setattr(profiling, "inference_precision",
                        lambda core, device, wanted: asked.append(wanted) or real(core, device, wanted))
    ops = openvino_op_breakdown(tmp_path / "h.xml", np.zeros((1, 3, 64, 64), np.float32), runs=1, threads=1)
    assert asked == ["f16"] and ops and abs(sum(o["share"] for o in ops) - 1) < 1e-6


def test_doctor_prepare_builds_what_nncf_compiles_on_first_use(cli, nncf_extension):
    """`vitseg doctor --prepare` builds NNCF's PyTorch extension (here already built by the session fixture): the
    status, the time and where it lives."""
    r = cli("doctor", "--json", "--prepare")
    assert r.exit_code == 0, r.stderr
    prepared = json.loads(r.stdout)["prepared"]
    assert prepared[0]["extension"] == "nncf quantized_functions_cpu" and prepared[0]["status"] == "already built"
    assert prepared[0]["build_dir"] == nncf_extension["build_dir"] and prepared[0]["seconds"] >= 0
    human = cli("doctor", "--prepare")
    assert human.exit_code == 0 and "nncf quantized_functions_cpu: already built" in human.stdout


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 (AVX512_BF16 or AMX), read from /proc/cpuinfo: independent of OpenVINO's report."""
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's bf16 flags from /proc/cpuinfo")
def test_a_bf16_ir_computes_in_bf16_where_the_cpu_has_it_and_says_so_where_not(tmp_path, cli):
    r = cli("export", "segformer-b0-test", "--format", "openvino", "--precision", "bf16", "-o", str(tmp_path / "b.xml"))
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((tmp_path / "b.xml.json").read_text())
    details = manifest["bf16"]
    here = "bf16" if _cpu_has_bf16() else "f32"
    assert details["weights"] == "fp32"  # OpenVINO rounds the weights when it compiles them
    assert details["inference_precision"]["hint"] == "bf16" and details["inference_precision"]["checked_with"] == here
    # what verify judges it by: the preset of bf16 (by hand: 99.5% agreement, mIoU 99, logits within 1.0 / 0.1 mean)
    verdict = verify_artifact(tmp_path / "b.xml", "segformer-b0-test", "synthetic[:3]", 3).to_json()
    assert verdict["precision"] == "bf16" and verdict["thresholds"] == {
        "min_agreement": 0.995, "min_miou_vs_reference": 0.99, "max_abs_logit_diff": 1.0, "max_mean_abs_logit_diff": 0.1,
        "max_nonfinite": 0}
    assert ("no bf16 arithmetic here (this CPU has none)" in r.stderr) == (here == "f32")
    with runner_for(tmp_path / "b.xml") as runner:
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == here
    # the same IR's fp32 twin computes in f32 on every CPU: bf16 is never chosen silently
    r = cli("export", "segformer-b0-test", "--format", "openvino", "-o", str(tmp_path / "f.xml"))
    with runner_for(tmp_path / "f.xml") as runner:
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    if here == "bf16":  # bf16 computes something else than f32: the two IRs' logits differ, within the preset
        pixels = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
        with runner_for(tmp_path / "b.xml") as b, runner_for(tmp_path / "f.xml") as f:
            diff = np.abs(b.infer({"pixels": pixels})["logits"] - f.infer({"pixels": pixels})["logits"]).max()
        assert 0 < diff <= 1.0


@pytest.mark.parametrize("fmt, output", [("onnx", "b.onnx")])
def test_bf16_where_vitseg_cannot_judge_it_is_refused_in_one_line(tmp_path, cli, fmt, output):
    r = cli("export", "segformer-b0-test", "--format", fmt, "--precision", "bf16", "-o", str(tmp_path / output))
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --precision bf16 is not offered for --format {fmt}: ")
    assert "use --format openvino, trt or trt-rtx with --precision bf16" in r.stderr and "exporting" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_isa_cap_decides_only_the_precisions_it_excludes(monkeypatch):
    from vitseg_export.runners.openvino_runner import inference_precision, lacks_why, openvino_core

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")  # oneDNN's old name for the same cap
    assert inference_precision(openvino_core(), "CPU", "bf16") == "f32"
    assert lacks_why("CPU", "bf16") == "ONEDNN_MAX_CPU_ISA=AVX2 caps this CPU below it"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # the new name wins; keeps bf16, not f16
    assert lacks_why("CPU", "bf16") == "this CPU has none"
    assert lacks_why("CPU", "f16") == "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 caps this CPU below it"
    assert inference_precision(openvino_core(), "CPU", "f16") == "f32"
    assert inference_precision(openvino_core(), "CPU", "bf16") == ("bf16" if _cpu_has_bf16() else "f32")
    assert lacks_why("GPU", "f16") == "this GPU has none"  # a CPU cap says nothing about another device


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="oneDNN's ISA cap names x86 instruction sets")
def test_a_bf16_ir_under_an_isa_cap_without_bf16_runs_f32_and_says_why(tmp_path, cli):
    """ONEDNN_MAX_CPU_ISA=AVX2 caps OpenVINO's kernels, but its plugin still reports BF16 and then fails to compile a
    bf16 Softmax: vitseg's runner takes the cap as the CPU's, computes in f32 and says so, naming the cap."""
    r = cli("export", "segformer-b0-test", "--format", "openvino", "--precision", "bf16", "-o", str(tmp_path / "b.xml"))
    assert r.exit_code == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "ONEDNN_MAX_CPU_ISA": "avx2"}
    proc = subprocess.run([sys.executable, "-c", HASWELL_CHILD, str(tmp_path / "b.xml")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["compiled"] == "f32"
    assert [w for w in seen["warnings"] if "ONEDNN_MAX_CPU_ISA=AVX2 caps this CPU below it" in w and "runs in f32 here" in w]
    # a cap that keeps bf16 changes nothing (the CPU's own flags decide, as without a cap)
    env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    proc = subprocess.run([sys.executable, "-c", HASWELL_CHILD, str(tmp_path / "b.xml")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["compiled"] == ("bf16" if _cpu_has_bf16() else "f32")


HASWELL_CHILD = r"""
import json, sys, warnings
from vitseg_export.runners.openvino_runner import OpenVINORunner
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runner = OpenVINORunner(sys.argv[1], "cpu").activate()
print(json.dumps({"compiled": runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
                  "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or os.uname().machine != "x86_64",
                    reason="needs qemu-x86_64 on an x86_64 machine (Debian's qemu-user, which .ci/run installs) to run "
                           "a CPU without bf16 (QEMU's Haswell model)")
def test_a_bf16_ir_on_a_cpu_without_bf16_runs_f32_and_says_so(tmp_path, cli):
    """OpenVINO computes in f32 without a word where the CPU has no bf16; vitseg's runner says it, in one warning."""
    r = cli("export", "segformer-b0-test", "--format", "openvino", "--precision", "bf16", "-o", str(tmp_path / "b.xml"))
    assert r.exit_code == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", HASWELL_CHILD, str(tmp_path / "b.xml")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["compiled"] == "f32"
    assert [w for w in seen["warnings"] if "computes in bf16" in w and "runs in f32 here" in w]
