"""`vitseg verify --locate`: faulty artifacts built on purpose, and the locator must name the place each was broken
(a block's weight, the input normalization, an fp16 LayerNorm that overflows, one quantized layer), find nothing in
exact and honest ones, and say the fix (`--keep-float`), which the exporters honour."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from vitseg_export.errors import VitsegError
from vitseg_export.export.int8 import quantized_layers
from vitseg_export.export.onnx_export import OnnxExportSettings, export_onnx
from vitseg_export.formats import read_artifact_info
from vitseg_export.settings import Int8Settings
from vitseg_export.verdict.locate import locate_artifact

INT8 = dict(calib="synthetic[:8]", calib_images=8, heldout="synthetic[:6]", allow_float_fallback=True)


def _copy_without_manifest(model: onnx.ModelProto, path: Path) -> Path:
    """A tampered artifact: the graph with its vitseg metadata, no manifest (its sha256 would not match)."""
    onnx.save(model, path)
    return path


def _scale_weight(model: onnx.ModelProto, node_part: str, factor: float) -> onnx.ModelProto:
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if node_part in n.name and n.op_type in ("MatMul", "Conv"))
    weight = inits[node.input[1]]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor), weight.name))
    return model


def _ir_of(onnx_path: Path, xml: Path) -> Path:
    """The ONNX artifact as an OpenVINO IR with vitseg's metadata (as `vitseg export --format openvino` saves one)."""
    import openvino as ov

    from vitseg_export.export.openvino_export import _save

    info = read_artifact_info(onnx_path)
    info = replace(info, format="openvino", extra={**info.extra, "inference_precision": '"f32"'})
    saved = _save(ov.convert_model(str(onnx_path)), info, False, xml.parent)
    saved.rename(xml)
    saved.with_suffix(".bin").rename(xml.with_suffix(".bin"))
    return xml


def test_a_perturbed_block_is_named_in_onnx_and_in_openvino(tmp_path, exported):
    """One block's MLP weight scaled by 5%: verify fails, and the locator names that block's Mix-FFN as the first
    divergence, every boundary before it within fp32's allowance."""
    from vitseg_export.verdict.verify import verify_artifact

    bad = _copy_without_manifest(_scale_weight(onnx.load(exported("segformer-b0-test")), "block.1.0/mlp/dense2/MatMul", 1.05),
                                 tmp_path / "bad.onnx")
    assert not verify_artifact(bad, "segformer-b0-test", "synthetic[:4]", 4).passed
    for artifact in (bad, _ir_of(bad, tmp_path / "bad.xml")):
        found = locate_artifact(artifact, "segformer-b0-test", "synthetic[:4]")
        assert found.path == ["encoder.layer_norm.1", "encoder.block.1.0", "encoder.block.1.0.mlp"], artifact
        assert found.verdict.startswith("first divergence: encoder.block.1.0 (Mix-FFN: encoder.block.1.0.mlp): SQNR ")
        rows = {r.name: r for r in found.boundaries}
        before = [r for r in found.boundaries if r.name in ("encoder.patch_embeddings.0.layer_norm", "encoder.layer_norm.0",
                                                             "encoder.patch_embeddings.1.layer_norm",
                                                             "encoder.block.1.0.layer_norm_1", "encoder.block.1.0.attention",
                                                             "encoder.block.1.0.layer_norm_2")]
        # every boundary before it within fp32's allowance (an IR may hold a stage output in no tensor of its own)
        assert len(before) == 6 and all(r.within is not False for r in before) and sum(bool(r.within) for r in before) >= 5
        assert rows["encoder.block.1.0.mlp"].sqnr_db < 60 and found.keep_float_command is None  # fp32: nothing to keep float
        assert found.seconds > 0 and found.peak_rss_mb > 0


def test_wrong_normalization_constants_stop_at_the_input(tmp_path, exported):
    model = onnx.load(exported("segformer-b0-test"))
    div = next(n for n in model.graph.node if n.name == "/segmenter/Div")
    constant = next(n for n in model.graph.node if div.input[1] in n.output)
    value = numpy_helper.to_array(constant.attribute[0].t) * np.float32(1.2)  # a wrong std
    constant.attribute[0].t.CopyFrom(numpy_helper.from_array(value))
    found = locate_artifact(_copy_without_manifest(model, tmp_path / "norm.onnx"), "segformer-b0-test", "synthetic[:4]")
    assert found.first_divergence == "input" and found.verdict.startswith("first divergence: input (normalized input)")


@pytest.mark.parametrize("name", ["segformer-b0-test", "vit-seg-tiny-test"])
def test_an_exact_artifact_has_no_divergence(exported, name):
    found = locate_artifact(exported(name), name, "synthetic[:4]")
    compared = [r for r in found.boundaries if r.within is not None]
    assert found.first_divergence is None and found.path == [] and len(compared) >= 5
    assert all(r.within and r.sqnr_db > 90 for r in compared)
    assert found.verdict == f"no divergence: all {len(compared)} boundaries compared are within fp32's allowance (SQNR >= 60 dB)"
    assert {r.name for r in found.boundaries} >= {"input", "logits"}


def _decompose_layernorm_in_fp16(model: onnx.ModelProto, scope: str) -> onnx.ModelProto:
    """One LayerNormalization computed as an fp16 build without an fp32 island computes it: the sum of squares held in
    fp16, where it overflows past 65504 (an explicit fp32 -> fp16 -> fp32 round trip, because ONNX Runtime's CPU
    provider would otherwise run fp16 reductions in fp32 and hide the overflow a GPU build has)."""
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    nodes = list(model.graph.node)
    ln = next(n for n in nodes if n.op_type == "LayerNormalization" and scope in n.name)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: node for node in nodes for o in node.output}

    def constant(name: str) -> np.ndarray:  # an initializer, possibly behind the Cast an fp16 conversion put before it
        return numpy_helper.to_array(inits[name]) if name in inits else constant(producers[name].input[0])

    x, scale, bias = ln.input[0], constant(ln.input[1]), constant(ln.input[2])
    p = ln.name + "_fp16"
    extra = {f"{p}_axes": np.array([-1], np.int64), f"{p}_inv_n": np.float32(1.0 / scale.size), f"{p}_eps": np.float32(1e-5),
             f"{p}_scale": scale.astype(np.float32), f"{p}_bias": bias.astype(np.float32)}
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in extra.items())
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    decomposed = [
        helper.make_node("Cast", [x], [f"{p}_x"], to=f32, name=f"{p}/cast_in"),
        helper.make_node("ReduceMean", [f"{p}_x"], [f"{p}_mean"], axes=[-1], keepdims=1, name=f"{p}/mean"),
        helper.make_node("Sub", [f"{p}_x", f"{p}_mean"], [f"{p}_d"], name=f"{p}/sub"),
        helper.make_node("Mul", [f"{p}_d", f"{p}_d"], [f"{p}_d2"], name=f"{p}/square"),
        helper.make_node("ReduceSum", [f"{p}_d2", f"{p}_axes"], [f"{p}_sum"], keepdims=1, name=f"{p}/sum"),
        helper.make_node("Cast", [f"{p}_sum"], [f"{p}_sum16"], to=f16, name=f"{p}/sum_in_fp16"),
        helper.make_node("Cast", [f"{p}_sum16"], [f"{p}_sum32"], to=f32, name=f"{p}/sum_back"),
        helper.make_node("Mul", [f"{p}_sum32", f"{p}_inv_n"], [f"{p}_var"], name=f"{p}/var"),
        helper.make_node("Add", [f"{p}_var", f"{p}_eps"], [f"{p}_ve"], name=f"{p}/eps"),
        helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_std"], name=f"{p}/sqrt"),
        helper.make_node("Div", [f"{p}_d", f"{p}_std"], [f"{p}_n"], name=f"{p}/div"),
        helper.make_node("Mul", [f"{p}_n", f"{p}_scale"], [f"{p}_s"], name=f"{p}/scale"),
        helper.make_node("Add", [f"{p}_s", f"{p}_bias"], [f"{p}_y"], name=f"{p}/shift"),
        helper.make_node("Cast", [f"{p}_y"], [ln.output[0]], to=types.get(ln.output[0], f32), name=f"{p}/cast_out")]
    index = nodes.index(ln)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:index] + decomposed + nodes[index + 1:])
    return model


def test_an_fp16_layernorm_that_overflows_is_named_with_its_non_finite_values(tmp_path, twin):
    """A model whose residual stream is large (as ViTs' often are) exports to fp16 fine (AutoCast keeps what exceeds
    fp16's range in fp32); one LayerNorm forced to fp16 overflows (its variance becomes inf: its output collapses to
    the bias), and the locator names it and the fix keeps it in float."""
    from vitseg_export.checkpoint import save_checkpoint

    loaded = twin("segformer-b0-test")
    with torch.no_grad():
        dense2 = loaded.model.encoder.block[1][0].mlp.dense2
        dense2.weight.mul_(1000.0)  # its stage's output LayerNorm reads values up to ~300: squares summing past 65504
        dense2.bias.mul_(1000.0)
    save_checkpoint(loaded.model, loaded.meta, tmp_path / "ck")
    result = export_onnx(loaded, tmp_path / "fp16.onnx", OnnxExportSettings(precision="fp16", parity_data="synthetic[:4]"))
    bad = _copy_without_manifest(_decompose_layernorm_in_fp16(result.model_proto, "encoder/layer_norm.1/"), tmp_path / "ln.onnx")
    found = locate_artifact(bad, str(tmp_path / "ck"), "synthetic[:4]")
    rows = {r.name: r for r in found.boundaries}
    assert found.first_divergence == "encoder.layer_norm.1" and rows["encoder.layer_norm.1"].sqnr_db < 10, found.verdict
    assert rows["encoder.patch_embeddings.1.layer_norm"].within and rows["encoder.block.1.0"].within  # what it reads is fine
    assert found.verdict.startswith("first divergence: encoder.layer_norm.1 (stage 2 output): SQNR ")
    assert found.keep_float == ["encoder.layer_norm.1"] and "--keep-float encoder.layer_norm.1" in found.keep_float_command


def test_an_honest_int8_artifact_raises_no_false_alarm(tmp_path, twin):
    path = tmp_path / "int8.onnx"
    export_onnx(twin("segformer-b0-test"), path, OnnxExportSettings(precision="int8"), int8=Int8Settings(**INT8))
    found = locate_artifact(path, "segformer-b0-test", "synthetic[:4]")
    rows = {r.name: r for r in found.boundaries}
    assert found.first_divergence is None, found.verdict
    assert rows["input"].sqnr_db > 90  # computed in fp32 in the int8 graph: an fp32-only boundary
    assert all(r.sqnr_db >= 20 for r in found.boundaries if r.within is not None)


def test_a_broken_quantized_layer_is_located_ranked_first_and_kept_float_by_the_fix(tmp_path, twin, cli):
    """One quantized layer's weight scale off by 4x: the locator names its block, ranks that layer first among the
    block's quantized layers, and prints the export command with --keep-float, which the exporter honours."""
    path = tmp_path / "int8.onnx"
    export_onnx(twin("segformer-b0-test"), path, OnnxExportSettings(precision="int8"), int8=Int8Settings(**INT8))
    model = onnx.load(path)
    target = next(n for n in quantized_layers(model) if "block.1.0/mlp/dense1" in n)
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == target)
    scale_name = producers[node.input[1]].input[1]  # the weight's DequantizeLinear scale
    scale = next(i for i in model.graph.initializer if i.name == scale_name)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(4.0), scale.name))
    bad = _copy_without_manifest(model, tmp_path / "bad-int8.onnx")
    found = locate_artifact(bad, "segformer-b0-test", "synthetic[:4]")
    assert found.path[1:] == ["encoder.block.1.0", "encoder.block.1.0.mlp"], found.verdict
    assert found.quantized_layers[0]["layer"] == target and found.quantized_layers[0]["module"] == "encoder.block.1.0.mlp.dense1"
    assert found.keep_float[0] == "encoder.block.1.0.mlp.dense1"
    assert "vitseg export segformer-b0-test --format onnx --precision int8 --keep-float encoder.block.1.0.mlp.dense1" in \
        found.keep_float_command
    out = tmp_path / "kept.onnx"
    r = cli("export", "segformer-b0-test", "--precision", "int8", "--calib", "synthetic[:8]", "--calib-images", "8",
            "--allow-float-fallback", "--keep-float", "encoder.block.1.0.mlp.dense1", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    q = json.loads(out.with_suffix(".onnx.json").read_text())["int8"]
    assert q["keep_float"] == ["encoder.block.1.0.mlp.dense1"]
    assert any(row["node"] == target and "kept in float (--keep-float encoder.block.1.0.mlp.dense1)" in row["reason"]
               for row in q["fallback_layers"])
    assert target not in quantized_layers(onnx.load(out))


@pytest.mark.parametrize("args,message", [
    (["--precision", "int8", "--keep-float", "encoder.block.9.0"], "--keep-float encoder.block.9.0: the network has no module "
                                                                    "of that name (use a module path such as encoder.block."),
    (["--precision", "fp32", "--keep-float", "encoder.block.0.0"], "--keep-float applies to the reduced precisions (fp16, int8)"),
    (["--format", "openvino", "--precision", "fp16", "--keep-float", "encoder.block.0.0"], "--keep-float: an OpenVINO fp16 IR"),
    (["--precision", "int8", "--keep-float", ","], "--keep-float ',' is empty")])
def test_keep_float_names_are_checked_in_one_line(tmp_path, cli, args, message):
    out = tmp_path / ("m.xml" if "openvino" in args else "m.onnx")
    r = cli("export", "segformer-b0-test", *args, "-o", str(out))
    assert r.exit_code == 2 and message in r.stderr and len([line for line in r.stderr.splitlines() if line.startswith("error")]) == 1, r.stderr
    assert not out.exists()


def test_fp16_keeps_the_named_module_in_fp32(tmp_path, twin):
    from vitseg_export.export.fp16 import fp32_nodes

    path = tmp_path / "fp16.onnx"
    result = export_onnx(twin("segformer-b0-test"), path, OnnxExportSettings(precision="fp16", keep_float=("encoder.block.1.0",)))
    kept = set(fp32_nodes(result.model_proto))
    inside = [n.name for n in result.model_proto.graph.node if n.name.startswith("/segmenter/net/encoder/block.1.0/")
              and n.op_type in ("MatMul", "Conv", "LayerNormalization")]
    assert inside and set(inside) <= kept
    assert result.manifest.precision_details["keep_float"] == ["encoder.block.1.0"]


def test_locate_refuses_what_it_cannot_read_in_one_line(tmp_path, exported, cli):
    model = onnx.load(exported("segformer-b0-test"))
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"  # names without module paths
    anonymous = _copy_without_manifest(model, tmp_path / "anonymous.onnx")
    with pytest.raises(VitsegError, match="names carry no module paths"):
        locate_artifact(anonymous, "segformer-b0-test", "synthetic[:4]")
    bare = onnx.load(exported("segformer-b0-test"))
    del bare.metadata_props[:]
    r = cli("verify", str(_copy_without_manifest(bare, tmp_path / "bare.onnx")), "-r", "segformer-b0-test", "--locate")
    assert r.exit_code == 2 and "vitseg metadata has no" in r.stderr
    r = cli("verify", str(anonymous), "-r", "segformer-b0-test", "--locate", "--num-images", "2")
    assert r.exit_code == 2 and "names carry no module paths" in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error")]) == 1


def test_cli_locate_prints_the_verdict_table_and_json(tmp_path, cli, exported):
    bad = _copy_without_manifest(_scale_weight(onnx.load(exported("segformer-b0-test")), "block.1.0/mlp/dense2/MatMul", 1.05),
                                 tmp_path / "bad.onnx")
    r = cli("verify", str(bad), "-r", "segformer-b0-test", "--locate", "--num-images", "4", "--report", str(tmp_path / "r.json"))
    assert r.exit_code == 3 and "first divergence: encoder.block.1.0 (Mix-FFN: encoder.block.1.0.mlp)" in r.stdout
    assert "FIRST" in r.stdout and "located in" in r.stdout  # the row marked (the column folds at 80 columns)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["locate"]["first_divergence"] == "encoder.block.1.0.mlp" and not report["passed"]
    assert {b["name"] for b in report["locate"]["boundaries"]} >= {"input", "encoder.block.1.0", "logits"}
