"""Quantization-aware training (`vitseg qat`): the fine-tuning loop, the Q/DQ graph a fake-quantized module
exports to, both formats' artifacts (OpenVINO IR through NNCF; ONNX for TensorRT and for ONNX Runtime through
NVIDIA Model Optimizer) verified against PyTorch, their `int8.qat` record, and the CLI's bad inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vitseg_export.compare.inputs import load_inputs
from vitseg_export.export.graph import quantize_constant_weights, remove_identity_casts
from vitseg_export.settings import ExportRequest, Int8Settings, OnnxExportSettings, QatSettings
from vitseg_export.train.qat import distillation_loss, fake_quant_scores, finetune
from vitseg_export.verdict.verify import verify_artifact

QAT = QatSettings(data="synthetic[:16]", epochs=1, batch_size=8, num_workers=0)


def _int8(**kw) -> Int8Settings:
    # allow_float_fallback: a tiny twin's int8 is slower than its fp32 on every CPU (too little work per op);
    # on a machine of the class the artifact is for, the speed check would refuse it
    return Int8Settings(calib="synthetic[:16]", calib_images=16, allow_float_fallback=True, **kw)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_distillation_finetune_moves_a_perturbed_student_towards_its_teacher(twin):
    teacher = twin("segformer-b0-test").segmenter().eval()
    student = copy.deepcopy(teacher)
    noise = torch.Generator().manual_seed(0)  # not the global RNG: the same student whatever ran before
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.05)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = distillation_loss(student(x), teacher(x)).item()
    record = finetune(student, teacher, QatSettings(data="synthetic[:32]", epochs=3, lr=1e-3, batch_size=8, num_workers=0),
                      (64, 64))
    with torch.no_grad():
        after = distillation_loss(student(x), teacher(x)).item()
    assert record["steps"] == 12 and record["first_loss"] > 0 and after < 0.7 * before
    assert distillation_loss(teacher(x), teacher(x)).abs().item() < 1e-6
    scores = fake_quant_scores(student, teacher, load_inputs("synthetic[:8]", "val", 8, (64, 64)), 3)
    # the student was moved towards its teacher (well above chance, a third for 3 classes) and is not the teacher:
    # under fake quantization it cannot agree on every pixel
    assert 0.5 < scores["pixel_agreement"] < 1.0 and scores["images"] == 8 and "miou_vs_labels" in scores


def _fake_quantized_weight_graph(w: np.ndarray, scale: np.ndarray, axis: int) -> onnx.ModelProto:
    """x @ Transpose(DQ(Q(W))) with W a Constant node and per-channel scales: what torch.onnx writes for a
    fake-quantized Linear, with a float -> float Cast in front of it."""
    zero = np.zeros(scale.shape, np.int8)
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)),
             helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT),
             helper.make_node("QuantizeLinear", ["W", "s", "z"], ["Wq"], axis=axis),
             helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wd"], axis=axis),
             helper.make_node("Transpose", ["Wd"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["xc", "Wt"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fake_quantized_weights_become_transposed_int8_initializers_computing_the_same():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 5)).astype(np.float32)  # (out, in), as nn.Linear keeps it
    scale = (np.abs(w).max(1) / 127).astype(np.float32)
    model = _fake_quantized_weight_graph(w, scale, axis=0)
    x = {"x": rng.normal(size=(2, 5)).astype(np.float32)}
    expected = _run(model, x)[0]
    assert quantize_constant_weights(model) == 1 and remove_identity_casts(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["DequantizeLinear", "MatMul"], ops
    dq = model.graph.node[0]
    weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq.input[0]))
    assert weights.dtype == np.int8 and weights.shape == (5, 4) and next(a.i for a in dq.attribute if a.name == "axis") == 1
    np.testing.assert_array_equal(weights.T, np.clip(np.rint(w / scale[:, None]), -128, 127).astype(np.int8))
    np.testing.assert_array_equal(_run(model, x)[0], expected)  # the same computation, bit for bit


def _qdq_weights(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(layer, int8 weight, scale) of every Conv/MatMul reading a dequantized constant."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul") and len(node.input) > 1:
            dq = producers.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                found.append((node.name, inits[dq.input[0]], inits[dq.input[1]]))
    return found


@pytest.mark.parametrize("target", ["trt", "cpu"])
def test_qat_onnx_for_tensorrt_and_onnxruntime_verifies_and_records_qat(twin, tmp_path, target):
    from vitseg_export.export.qat_onnx import qat_onnx

    path = tmp_path / f"q-{target}.onnx"
    request = ExportRequest("onnx", OnnxExportSettings(precision="int8", parity_data="synthetic[:8]"), _int8(target=target))
    result = qat_onnx(twin("segformer-b0-test"), path, request, QAT, lambda m: None)
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    details = manifest["int8"]
    record = details["qat"]
    assert record["steps"] == 2 and record["epochs"] == 1 and record["data"] == "synthetic[:16]"
    for stage in ("ptq_before_training", "qat_before_fallback"):
        assert 0.9 < record[stage]["pixel_agreement"] <= 1.0
    assert details["int8_mac_share"] > 0.5 and details["target"] == target
    model = result.model_proto
    weights = _qdq_weights(model)
    assert weights and all(w.dtype == np.int8 for _, w, _ in weights)
    assert not [n for n in model.graph.node if n.op_type == "Cast"]  # float -> float Casts removed
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and producers.get(n.input[0]) == "DequantizeLinear"]
    depthwise = {n.name for n in model.graph.node if n.op_type == "Conv" and
                 next((a.i for a in n.attribute if a.name == "group"), 1) > 1}
    quantized = {name for name, _, _ in weights}
    if target == "cpu":  # ONNX Runtime's CPU kernels: depthwise float, per-tensor 7-bit weights (avx2 class)
        assert not depthwise & quantized and details["cpu_class"] == "avx2"
        assert all(s.size == 1 and np.abs(w).max() <= 63 for _, w, s in weights)
    else:  # TensorRT: depthwise int8 too, per-channel weights
        assert depthwise <= quantized and any(s.size > 1 for _, _, s in weights)
        assert details["float_part"] == "fp32"
    verdict = verify_artifact(path, "segformer-b0-test", "synthetic[:8]", 8)
    assert verdict.passed, verdict.to_json()


def test_qat_openvino_ir_verifies_and_keeps_depthwise_float(twin, tmp_path, nncf_extension):
    openvino = pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install -e '.[openvino]')")
    pytest.importorskip("nncf", reason="NNCF is an optional extra (pip install -e '.[openvino]')")
    from vitseg_export.export.openvino_export import ir_weight_layers
    from vitseg_export.export.qat_openvino import qat_openvino

    path = tmp_path / "q.xml"
    request = ExportRequest("openvino", OnnxExportSettings(precision="int8", dynamic_batch=False, parity_data="synthetic[:8]"),
                            _int8())
    steps: list[tuple] = []
    qat_openvino(twin("segformer-b0-test"), path, request, QAT, lambda m: None,
                 lambda message, done=None, total=None, **info: steps.append((info["epoch"], done, total, info["loss"])))
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    details = manifest["int8"]
    assert [s[:3] for s in steps] == [(1, 1, 2), (1, 2, 2)] and all(np.isfinite(s[3]) for s in steps)
    assert details["qat"]["steps"] == 2 and details["int8_mac_share"] > 0.5 and details["cpu_class"] == "avx2"
    assert nncf_extension["status"] in ("built", "already built") and details["qat"]["nncf_extension"] == "already built"
    layers = ir_weight_layers(openvino.Core().read_model(path))
    depthwise = {op.get_friendly_name() for op in openvino.Core().read_model(path).get_ordered_ops()
                 if op.get_type_name() == "GroupConvolution"}
    assert depthwise and not [name for name in depthwise if layers.get(name)]  # slower in int8: kept float
    assert sum(layers.values()) == details["quantized_layers"] > 0
    verdict = verify_artifact(path, "segformer-b0-test", "synthetic[:8]", 8)
    assert verdict.passed, verdict.to_json()


def test_qat_cli_writes_an_artifact_and_refuses_bad_input_in_one_line(cli, tmp_path, exported):
    out = tmp_path / "q.onnx"
    r = cli("qat", "segformer-b0-test", "--format", "onnx", "--target", "trt", "--data", "synthetic[:16]",
            "--calib-images", "8", "-o", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    written = json.loads(r.stdout)
    assert written["artifact"] == out.name and out.is_file() and written["metadata"]["precision"] == "int8"
    onnx_artifact = exported("segformer-b0-test")
    bad = [
        (("qat", "segformer-b0-test", "--format", "trt", "-o", str(tmp_path / "x.engine")), "no quantization-aware training"),
        (("qat", "segformer-b0-test", "--format", "openvino", "--target", "trt"), "--target applies to --format onnx"),
        (("qat", "segformer-b0-test", "--target", "gpu"), "Invalid value for '--target'"),
        (("qat", "segformer-b0-test", "--target", "trt", "--cpu-class", "vnni"), "--cpu-class applies"),
        (("qat", "segformer-b0-test", "--cpu-class", "avx9"), "Invalid value for '--cpu-class'"),
        (("qat", str(onnx_artifact), "-o", str(tmp_path / "y.onnx")), "starts from a checkpoint"),
        (("qat", "segformer-b0-test", "-o", str(tmp_path / "y.xml")), "writes .onnx files"),
        (("qat", "segformer-b0-test", "--data", f"folder:{tmp_path / 'missing'}"), "missing"),
        (("qat", str(tmp_path / "nothing.safetensors"), "-o", str(tmp_path / "z.onnx")), "nothing.safetensors"),
    ]
    for args, says in bad:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "y.onnx").exists() and not (tmp_path / "z.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.json"]


def test_qat_keeps_the_checkpoint_model_float(twin, tmp_path):
    """The quantizers swap modules in place: the checkpoint's own model (the teacher, and the self-parity
    reference) must stay the fp32 model."""
    from vitseg_export.export.qat_onnx import qat_onnx

    loaded = twin("segformer-b0-test")
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    request = ExportRequest("onnx", OnnxExportSettings(precision="int8", fold=False, parity_data="synthetic[:4]"),
                            _int8(target="trt"))
    qat_onnx(loaded, tmp_path / "q.onnx", request, QAT, lambda m: None)
    assert {type(m).__name__ for m in loaded.model.modules()} == kinds
    assert Path(tmp_path / "q.onnx").is_file()


def test_training_that_lowers_agreement_is_discarded_and_recorded(twin):
    from vitseg_export.train.qat import fine_tuned

    teacher = twin("segformer-b0-test").segmenter().eval()
    student = copy.deepcopy(teacher)  # agrees everywhere: any training can only lower agreement
    heldout = load_inputs("synthetic[:8]", "val", 8, (64, 64))
    record = fine_tuned(student, teacher, QatSettings(data="synthetic[:16]", lr=1e-2, batch_size=8, num_workers=0),
                        (64, 64), heldout, 3, lambda m: None)
    assert record["ptq_before_training"]["pixel_agreement"] == 1.0
    assert record["qat_before_fallback"]["pixel_agreement"] < 1.0 and record["kept"].startswith("ptq")
    for (name, a), b in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, b), name  # the untrained state is back


def test_training_that_leaves_agreement_as_it_was_is_not_called_lowering(twin):
    """Equal within 0.01 pt (the resolution the agreement is read at) is unchanged: the trained state is kept and
    the record does not say training lowered it."""
    from vitseg_export.train.qat import fine_tuned

    teacher = twin("segformer-b0-test").segmenter().eval()
    student = copy.deepcopy(teacher)
    heldout = load_inputs("synthetic[:8]", "val", 8, (64, 64))
    said: list[str] = []
    record = fine_tuned(student, teacher, QatSettings(data="synthetic[:16]", lr=1e-12, batch_size=8, num_workers=0),
                        (64, 64), heldout, 3, said.append)
    assert record["kept"] == "qat (training left held-out agreement unchanged)"
    assert "unchanged" in said[-1] and "lowered" not in said[-1]


@pytest.mark.parametrize("target", ["trt", "cpu"])
def test_the_qat_model_and_its_onnx_agree_within_the_int8_preset(twin, target):
    """What separated vitseg's first QAT graph from its PyTorch model on an AVX2-only CPU was the CPU's integer
    kernels (8-bit weights saturate there): the fake-quantized module and the Q/DQ graph it exports, run as vitseg
    runs it (exact int8 on every CPU class), agree within the int8 preset."""
    from vitseg_export.compare.metrics import confusion, miou
    from vitseg_export.export.qat_onnx import fake_quantized, qdq_graph
    from vitseg_export.modeling.export_graph import exported_module
    from vitseg_export.precisions import get_precision
    from vitseg_export.runners.onnxruntime_runner import graph_runner

    loaded = twin("segformer-b0-test")
    settings = OnnxExportSettings(precision="int8")
    quantized = fake_quantized(copy.deepcopy(exported_module(loaded.model, loaded.meta.mean, loaded.meta.std)[0]),
                               load_inputs("synthetic[:16]", "calib", 16, (64, 64)), _int8(target=target))
    graph = qdq_graph(quantized, (64, 64), settings)
    pixels = np.stack([im.pixels for im in load_inputs("synthetic[:8]", "val", 8, (64, 64)).images])
    with torch.no_grad():
        torch_masks = quantized(torch.from_numpy(pixels)).argmax(1).numpy()
    with graph_runner(graph, (64, 64), 3, "int8", "avx2" if target == "cpu" else "") as runner:
        onnx_masks = runner.infer({"pixels": pixels})["logits"].argmax(1)
    preset = get_precision("int8").thresholds
    assert (torch_masks == onnx_masks).mean() >= preset.min_agreement
    assert miou(confusion(onnx_masks, torch_masks, 3)) >= preset.min_miou_vs_reference
