from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import make_image_folder
from onnx import TensorProto

from vitseg_export.export.int8 import attention_matmuls, quantized_layers
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.runners import runner_for
from vitseg_export.settings import Int8Settings
from vitseg_export.verdict.verify import verify_artifact

NON_FLOAT_OUTPUT = {"ArgMax": TensorProto.INT64, "Shape": TensorProto.INT64, "Equal": TensorProto.BOOL,
                    "Less": TensorProto.BOOL, "Greater": TensorProto.BOOL, "NonZero": TensorProto.INT64}


def _float32_compute_nodes(model) -> set[str]:
    """The compute nodes that produce float32, found by walking the graph in order and giving each output its dtype
    by the op's own rule (a Cast's `to`, a Constant's value, an op with fixed-type output, else its first float
    input's type): independent of ONNX shape inference, which `fp32_nodes` uses."""
    dtype = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    dtype.update({t.name: t.data_type for t in model.graph.initializer})
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    found = set()
    for n in model.graph.node:
        if n.op_type == "Cast":
            out = next(a.i for a in n.attribute if a.name == "to")
        elif n.op_type == "Constant":
            out = next(a.t.data_type for a in n.attribute if a.name == "value")
        elif n.op_type in NON_FLOAT_OUTPUT:
            out = NON_FLOAT_OUTPUT[n.op_type]
        else:
            out = next((dtype[i] for i in n.input if dtype.get(i) in floats), TensorProto.INT64)
        for o in n.output:
            dtype[o] = out
        if out == TensorProto.FLOAT and n.op_type not in ("Cast", "Constant", "Shape"):
            found.add(n.name)
    return found


def test_fp16_islands_kept_by_name_are_the_graphs_float32_nodes(tmp_path, twin):
    """--keep-float puts a block in fp32: the manifest's fp32 nodes are exactly the float32 compute nodes (second
    method), all inside that block, and cover its matrix multiplies."""
    path = tmp_path / "k.onnx"
    result = export_onnx(twin("segformer-b0-test"), path, OnnxExportSettings(precision="fp16", keep_float=("encoder.block.0.0",)))
    model = onnx.load(path)
    kept = _float32_compute_nodes(model)
    assert kept == set(result.manifest.precision_details["fp32_nodes"])
    block = {n.name for n in model.graph.node if "/encoder/block.0.0/" in n.name}
    matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.name in block}
    assert matmuls and matmuls <= kept <= block


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("name", ["segformer-b0-test", "vit-seg-tiny-test"])
def test_fp16_export_is_data_driven_clean_and_passes_the_fp16_preset(tmp_path, twin, name):
    path = tmp_path / "m16.onnx"
    result = export_onnx(twin(name), path, OnnxExportSettings(precision="fp16", outputs="both"))
    details = result.manifest.precision_details
    assert details["converter"].startswith("modelopt.onnx.autocast") and isinstance(details["fp32_nodes"], list)
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # fp32 I/O by default
    assert sum(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer) > 10  # the weights are fp16
    # a random twin has no value above AutoCast's 512: nothing is kept in fp32, read by a second method (the
    # dtypes walked through the graph by hand, not ONNX shape inference as fp32_nodes does)
    assert _float32_compute_nodes(model) == set(details["fp32_nodes"]) == set()
    graph = result.manifest.extra["graph"]
    # fp32 I/O costs one Cast in and one per output (logits, and the mask's argmax input): 3 measured; more is a
    # regression in the cast placement (the trained B0 at 128 has 35 with its fp32 islands, docs/guides)
    assert graph["dead_nodes"] == 0 and graph["casts"] == 3, graph
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props["vitseg.precision"] == "fp16"
    verdict = verify_artifact(path, name, "synthetic[:4]", 4)
    assert verdict.passed, verdict.failures
    assert verdict.thresholds.min_agreement == 0.999
    # judged alone and inside a batch (dynamic batch), and the two agree with each other
    report = verdict.to_json()
    assert [s["batch"] for s in report["shapes"]] == [1, 4, 8] and all(s["passed"] for s in report["shapes"])
    assert report["batch_consistency"]["passed"] and report["batch_consistency"]["images_compared"] == 8  # 4 images at batches 4 and 8 against batch 1
    assert [s["batch"] for s in result.manifest.self_parity["shapes"]] == [1, 4, 8]


def test_fp16_io(exported):
    path = exported("segformer-b1-test", precision="fp16", fp16_io=True)
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    with runner_for(path) as runner:  # the runner feeds float16 itself and returns float32 logits
        out = runner.infer({"pixels": np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)})
    assert out["logits"].dtype == np.float32 and np.isfinite(out["logits"]).all()


def _int8(tmp_path, twin, name, **kw):
    # the tiny twins run in well under a millisecond: int8 there is not judged on speed (tests of the refusal are)
    settings = Int8Settings(calib="synthetic[:8]", calib_images=8, heldout="synthetic[:6]",
                            **{"allow_float_fallback": True, **kw})
    path = tmp_path / f"{name}-int8.onnx"
    result = export_onnx(twin(name), path, OnnxExportSettings(precision="int8", outputs="both"), int8=settings)
    return path, result.manifest.to_json()


@pytest.mark.parametrize("target", ["trt", "cpu"])
def test_int8_qdq_is_symmetric_and_leaves_norms_in_float(tmp_path, twin, exported, target):
    path, manifest = _int8(tmp_path, twin, "segformer-b0-test", target=target)
    model = onnx.load(path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = _producers(model)
    qnodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qnodes
    for n in qnodes:
        zp = inits[n.input[2]] if len(n.input) > 2 and n.input[2] in inits else None
        # symmetric: zero point 0; int8 everywhere except the cpu target's int32 biases (Conv/MatMul bias path)
        assert zp is not None and not zp.any(), n.name
        assert zp.dtype == np.int8 or (zp.dtype == np.int32 and "bias" in n.name), n.name
    # trt: per-channel weights on the output-channel axis (Conv: 0; MatMul with constant B [K, N]: 1);
    # cpu: per-tensor weights (faster in onnxruntime's CPU kernels)
    weights_seen, quantized_weights = 0, set()
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul"):
            continue
        w = producers.get(n.input[1])
        if w is not None and w.op_type == "Cast":  # trt target: fp16 float part, DQ -> Cast -> op
            w = producers.get(w.input[0])
        if w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits:
            weights_seen += 1
            quantized_weights.add(n.name)
            if target == "trt":
                axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
                assert axis == (0 if n.op_type == "Conv" else 1), n.name
                assert inits[w.input[1]].size == inits[w.input[0]].shape[axis]
            else:
                assert inits[w.input[1]].size == 1, n.name
    assert weights_seen > 5
    consumers = [n for n in model.graph.node for i in n.input if i in producers and producers[i].op_type == "DequantizeLinear"]
    if target == "cpu":  # only MatMul/Gemm and dense Conv inputs are quantized; LayerNorm, Softmax, GELU, residual
        # Adds and the depthwise convolutions (slower in int8 in ONNX Runtime) stay float
        assert consumers and {n.op_type for n in consumers} <= {"MatMul", "Gemm", "Conv", "Add"}
        assert not [n.name for n in consumers if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        assert all(inits[producers[i].input[0]].dtype == np.int32 for n in consumers if n.op_type == "Add"
                   for i in n.input if i in producers and producers[i].op_type == "DequantizeLinear")  # only biases
    else:  # Model Optimizer places Q/DQ where TensorRT fuses them; the float part is fp16, with 2-3 Casts
        assert consumers and manifest["graph"]["casts"] <= 3  # 2-3 documented: the input, the outputs
    assert manifest["graph"]["dead_nodes"] == 0
    # attention's activation x activation MatMuls (Q.K^T, softmax.V) read no int8 input on either target
    # (softmax probabilities fall under one int8 step at long sequences)
    attention = set(attention_matmuls(onnx.load(exported("segformer-b0-test", outputs="both"))))
    assert len(attention) >= 2 and attention <= {n.name for n in model.graph.node}
    assert not set(quantized_layers(model)) & attention
    q = manifest["int8"]
    # the MAC share by hand: the layers found quantized by the walk above, weighed by ONNX Runtime's shapes of the
    # fp32 graph (nothing fell back here: every layer the walk finds is int8)
    from vitseg_export.export.int8 import node_macs

    macs = node_macs(onnx.load(exported("segformer-b0-test", outputs="both")), np.zeros((1, 3, 64, 64), np.float32))
    assert manifest["metadata"]["precision"] == "int8" and not q.get("fallback_layers")
    assert q["int8_mac_share"] == pytest.approx(sum(macs[name] for name in quantized_weights) / sum(macs.values()), rel=1e-6)
    assert q["calibration"]["images"] == 8 and q["calibration"]["method"] == "minmax"
    assert len(q["calibration"]["image_list_sha256"]) == 16 and (q["calibration"]["ranges"] or target == "trt")
    assert q["quantization"]["target"] == target
    assert verify_artifact(path, "segformer-b0-test", "synthetic[:6]", 6).precision == "int8"
    parity = manifest["self_parity"]  # judged at batch 1 and inside a batch of 4 before it was written
    assert [s["batch"] for s in parity["shapes"]] == [1, 4, 8] and all(s["passed"] for s in parity["shapes"])
    assert parity["batch_consistency"]["passed"] and parity["batch_consistency"]["images_compared"] >= 8


def test_calibration_cache_is_reused(tmp_path, monkeypatch, twin):
    _int8(tmp_path, twin, "vit-seg-tiny-test")
    caches = list((tmp_path / ".vitseg-calibration-cache").glob("ranges-*.json"))
    assert len(caches) == 1
    import importlib

    q = importlib.import_module("onnxruntime.quantization.quantize")

    def no_calibration(*a, **k):
        raise AssertionError("re-calibrated although ranges were cached")

    monkeypatch.setattr(q, "create_calibrator", no_calibration)
    _int8(tmp_path, twin, "vit-seg-tiny-test")


def test_fallback_keeps_sensitive_layers_in_float_until_the_target_is_met(tmp_path, twin):
    path, manifest = _int8(tmp_path, twin, "vit-seg-tiny-test", min_agreement=1.0, min_miou_vs_reference=1.0)
    q = manifest["int8"]
    assert q["fallback_layers"], "an exact target must force layers back to float"
    assert all("SQNR" in row["reason"] for row in q["fallback_layers"])
    sqnrs = [row["sqnr_db_when_float"] for row in q["fallback_layers"]]
    assert sqnrs == sorted(sqnrs, reverse=True)  # most helpful first
    assert q["heldout_agreement"] == 1.0
    model = onnx.load(path)
    float_nodes = {row["node"] for row in q["fallback_layers"]}
    producers = _producers(model)
    for n in model.graph.node:
        if n.name in float_nodes:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input), n.name


def test_int8_trt_target_runs_float_part_in_fp16(tmp_path, twin):
    path, manifest = _int8(tmp_path, twin, "segformer-b0-test", target="trt")
    assert manifest["int8"]["float_part"] == "fp16" and manifest["int8"]["quantization"]["quantizer"].startswith("modelopt")
    model = onnx.load(path)
    types = {i.data_type for i in model.graph.initializer}
    assert TensorProto.FLOAT16 in types and TensorProto.INT8 in types
    assert not any(i.data_type == TensorProto.INT32 for i in model.graph.initializer)  # no int32 bias for the parser


def test_cli_export_int8_reports_mac_share(tmp_path, cli):
    r = cli("export", "vit-seg-tiny-test", "--precision", "int8", "--calib", "synthetic[:4]", "--calib-images", "4",
            "--allow-float-fallback", "-o", str(tmp_path / "q.onnx"))
    assert r.exit_code == 0, r.stderr
    assert "of MACs run in int8" in r.stdout
    bad = cli("export", "vit-seg-tiny-test", "--precision", "int8", "--calib-method", "magic", "-o", str(tmp_path / "b.onnx"))
    assert bad.exit_code == 2 and "Invalid value for '--calib-method'" in bad.stderr and not (tmp_path / "b.onnx").exists()
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    r = cli("export", "vit-seg-tiny-test", "--precision", "int8", "--calib", f"folder:{empty}", "-o", str(tmp_path / "c.onnx"))
    assert r.exit_code == 2 and "no images" in r.stderr and not (tmp_path / "c.onnx").exists()


def test_int8_is_judged_on_the_users_own_data(tmp_path, twin):
    """--calib folder:DIR: the held-out images that decide the fallback come from that folder's validation
    split (disjoint from its calibration images), and self-parity runs on the --data the user gave."""
    from vitseg_export.data.sources import open_source

    spec = make_image_folder(tmp_path / "data", 20, random_classes=3)
    calib_names = {open_source(spec, "calib").name_of(i) for i in range(len(open_source(spec, "calib")))}
    val_names = {open_source(spec, "val").name_of(i) for i in range(len(open_source(spec, "val")))}
    assert val_names and not calib_names & val_names
    settings = Int8Settings(calib=spec, calib_images=8, allow_float_fallback=True)
    result = export_onnx(twin("vit-seg-tiny-test"), tmp_path / "q.onnx",
                         OnnxExportSettings(precision="int8", parity_data=spec), int8=settings)
    q = result.manifest.precision_details
    assert q["heldout"]["source"].startswith(f"{spec} split=val") and q["heldout"]["images"] == 2
    assert q["calibration"]["source"].startswith(f"{spec} split=calib")
    assert result.manifest.self_parity["source"].startswith(f"{spec} split=val")
    default = export_onnx(twin("vit-seg-tiny-test"), tmp_path / "d.onnx", OnnxExportSettings(precision="int8"),
                          int8=Int8Settings(calib="synthetic[:4]", calib_images=4, allow_float_fallback=True))
    assert default.manifest.precision_details["heldout"]["source"].startswith("synthetic") and "split=val" in \
        default.manifest.precision_details["heldout"]["source"]
