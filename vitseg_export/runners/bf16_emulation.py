"""A bf16 ONNX graph (Model Optimizer's AutoCast with bf16, for TensorRT) made runnable on ONNX Runtime's CPU
provider, which has no bf16 kernels: every op that computes in bf16 computes in fp32 from the same bf16 values, and
its result is rounded to bf16 (Cast to bf16 and back, round to nearest even) before anything reads it. That is bf16
storage with fp32 arithmetic inside each op: what tensor cores do for matrix products (fp32 accumulation, bf16
results). A GPU engine may fuse ops and skip some of those roundings, so an engine's own verdict still comes from
running it on its GPU; this is how vitseg judges the bf16 ONNX graph beside it on any machine.

Needs the `onnx` package (imported when a bf16 graph is run, not before)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vitseg_export.errors import VitsegError
from vitseg_export.tables import lazy_module

onnx = lazy_module("onnx")

ROUNDED = "__bf16_unrounded"  # suffix of an op's fp32 result before it is rounded to bf16


def load_graph(source: bytes | str) -> Any:
    """The ModelProto of serialized bytes or a file path."""
    return onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)


def has_bf16(model: Any) -> bool:
    """Whether a graph holds bf16 tensors (initializers, Casts to bf16, or bf16 inputs/outputs)."""
    BF16 = onnx.TensorProto.BFLOAT16
    return (any(t.data_type == BF16 for t in model.graph.initializer)
            or any(n.op_type == "Cast" and _attr(n, "to") == BF16 for n in model.graph.node)
            or any(v.type.tensor_type.elem_type == BF16 for v in [*model.graph.input, *model.graph.output]))


def _attr(node: Any, name: str) -> Any:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _bf16_to_fp32(tensor: Any) -> Any:
    """A bf16 TensorProto as the fp32 tensor of the same values (exact: bf16 is fp32's upper 16 bits)."""
    if tensor.raw_data:
        bits = np.frombuffer(tensor.raw_data, dtype=np.uint16)
    else:  # int32_data holds one bf16 per element
        bits = np.asarray(tensor.int32_data, dtype=np.uint32).astype(np.uint16)
    values = (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(tensor.dims))
    return onnx.numpy_helper.from_array(values, tensor.name)


def emulated(model: Any) -> Any:
    """A copy of the bf16 graph `model` in fp32 with every bf16 result rounded to bf16 (see the module docstring).
    VitsegError for a graph this rewrite does not cover (a bf16 graph input or output, an op that makes bf16 from
    an attribute other than a Cast or a Constant)."""
    BF16, FLOAT = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    if any(v.type.tensor_type.elem_type == BF16 for v in [*model.graph.input, *model.graph.output]):
        raise VitsegError("a graph with bf16 inputs or outputs cannot be run on ONNX Runtime's CPU provider",
                          "export it with float32 inputs and outputs (the default)")
    inferred = onnx.shape_inference.infer_shapes(model)
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                              *inferred.graph.output]}
    dtype.update({t.name: t.data_type for t in model.graph.initializer})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == BF16:
            graph.initializer[i].CopyFrom(_bf16_to_fp32(tensor))
    del graph.value_info[:]  # the types change: ONNX Runtime infers them again
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and _attr(node, "value") is not None and _attr(node, "value").data_type == BF16:
            value = next(a for a in node.attribute if a.name == "value")
            value.t.CopyFrom(_bf16_to_fp32(value.t))
            nodes.append(node)
            continue
        if node.op_type == "Cast" and _attr(node, "to") == BF16:  # fp32 -> bf16: the rounding, kept in fp32
            nodes += [onnx.helper.make_node("Cast", [node.input[0]], [node.output[0] + ROUNDED], to=BF16,
                                            name=node.name + "/to_bf16"),
                      onnx.helper.make_node("Cast", [node.output[0] + ROUNDED], [node.output[0]], to=FLOAT,
                                            name=node.name)]
            continue
        bf16_outputs = [o for o in node.output if o and dtype.get(o) == BF16]
        if not bf16_outputs:
            nodes.append(node)
            continue
        if node.op_type in ("ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"):
            raise VitsegError(f"the bf16 graph's node {node.name} ({node.op_type}) makes bf16 values from an attribute, "
                              "which vitseg's CPU emulation does not cover", "report this with the model")
        renamed = {o: o + ROUNDED for o in bf16_outputs}
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.output[:]
        copy.output.extend([renamed.get(o, o) for o in node.output])
        nodes.append(copy)
        for o in bf16_outputs:  # its fp32 result, rounded to bf16 as a bf16 engine stores it
            nodes += [onnx.helper.make_node("Cast", [renamed[o]], [o + ROUNDED + "_bf16"], to=BF16, name=f"{node.name}/{o}/round"),
                      onnx.helper.make_node("Cast", [o + ROUNDED + "_bf16"], [o], to=FLOAT, name=f"{node.name}/{o}/back")]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


__all__ = ["emulated", "has_bf16", "load_graph"]
