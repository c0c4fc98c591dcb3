"""nn.Module -> ONNX graph (`module_to_onnx`), and small exact operations on ONNX graphs that the precision steps
share: dead-node removal, a static batch from a dynamic one, the figures a manifest reports (nodes, Casts, dead
nodes), and returning chosen layers of a Q/DQ graph to float.

We export with torch's TorchScript-based exporter (`dynamo=False`): it writes the requested opset directly (the
dynamo exporter exports at 18 and silently keeps 18 when down-conversion fails) and takes about 2 s for B0 instead
of 22 s. Either way the opset actually written is checked.

Every exported graph goes through `remove_dead_nodes`: a node whose outputs reach no graph output is
removed (TensorRT and `polygraphy check lint` flag them; ONNX Runtime's quantizer and fp16 converter used
to leave hundreds)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from vitseg_export.errors import VitsegError
from vitseg_export.settings import OnnxExportSettings


def dynamic_axes(settings: OnnxExportSettings) -> dict[str, dict[int, str]] | None:
    """torch.onnx's dynamic_axes for the settings' dynamic batch and size (None: static)."""
    if not (settings.dynamic_batch or settings.dynamic_size):
        return None
    axes_in = {0: "batch"} if settings.dynamic_batch else {}
    if settings.dynamic_size:
        axes_in.update({2: "height", 3: "width"})
    axes = {"pixels": axes_in}
    for name in settings.output_names:
        dims = {0: "batch"} if settings.dynamic_batch else {}
        if settings.dynamic_size:
            dims.update({1: "height", 2: "width"} if name == "mask" else {2: "height", 3: "width"})
        axes[name] = dims
    return axes


def module_to_onnx(graph: nn.Module, size: tuple[int, int], settings: OnnxExportSettings) -> onnx.ModelProto:
    """An ExportGraph through torch.onnx (TorchScript) at the requested opset (checked), with vitseg's input and
    output names and dynamic axes. Also exports fake-quantized modules (`vitseg qat`) as Q/DQ graphs."""
    # Dynamic batch needs a batch-2 example, or the batch dimension may specialize to 1.
    example = torch.rand(2 if settings.dynamic_batch else 1, 3, *size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic and the exporter deprecation note
        torch.onnx.export(graph, (example,), buffer, input_names=["pixels"], output_names=settings.output_names,
                          opset_version=settings.opset, dynamic_axes=dynamic_axes(settings), do_constant_folding=True,
                          dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != settings.opset:
        raise VitsegError(f"the exporter wrote opset {written}, not the requested {settings.opset}",
                          f"use --opset {written} or report the model; vitseg does not ship a silently changed opset")
    return model


def with_static_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a dynamic-batch graph whose inputs and outputs take batch 1 only: a static-batch artifact made
    from the one exported graph (ONNX Runtime and OpenVINO fold its shape arithmetic for the fixed batch). Judged
    like every artifact before it is written."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in [*static.graph.input, *static.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    return static


def live_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes whose outputs some graph output depends on, in graph order (which need not be topological:
    quantizers append their Q/DQ nodes at the end)."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    live: set[int] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in live:
            live.add(index)
            stack.extend(i for i in model.graph.node[index].input if i)
    return [n for i, n in enumerate(model.graph.node) if i in live]


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes that affect no output, and initializers nothing reads (in place); returns how many nodes."""
    live = live_nodes(model)
    dead = len(model.graph.node) - len(live)
    if dead:
        keep = [onnx.NodeProto() for _ in live]
        for copy, node in zip(keep, live):
            copy.CopyFrom(node)
        del model.graph.node[:]
        model.graph.node.extend(keep)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    return dead


def graph_stats(model: onnx.ModelProto) -> dict:
    """The figures every manifest reports about its graph: nodes, Cast nodes, dead nodes, Q/DQ nodes."""
    ops = [n.op_type for n in model.graph.node]
    return {"nodes": len(ops), "casts": ops.count("Cast"), "dead_nodes": len(ops) - len(live_nodes(model)),
            "qdq_nodes": ops.count("QuantizeLinear") + ops.count("DequantizeLinear")}


def _dequantized(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The float values a DequantizeLinear of a constant computes: (q - zero_point) * scale, along its axis."""
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:  # per-channel: broadcast along `axis`
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    return ((q - zero) * scale.astype(np.float32)).astype(scale.dtype)


def to_float(model: onnx.ModelProto, layers: set[str], original: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of a Q/DQ graph where the named layers (Conv/MatMul/Gemm nodes, and the Add of their bias)
    read float inputs again: an activation's Q->DQ is skipped, a constant's DQ is replaced by its dequantized
    values in the DQ's output type (a quantized bias by its dequantized values too) — or, given the `original`
    fp32 graph, by the original float constant of the same node and input, so a layer returned to float
    computes exactly what it did before quantization. Dead Q/DQ nodes are removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producers = {o: n for n in out.graph.node for o in n.output}
    inits = {i.name: i for i in out.graph.initializer}
    source = _original_constants(original) if original is not None else {}
    reverted = [n for n in out.graph.node if n.name in layers]
    outputs = {o for n in reverted for o in n.output}
    reverted += [n for n in out.graph.node if n.op_type == "Add" and outputs & set(n.input)]  # their quantized bias
    for node in reverted:
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
            elif dq.input[0] in inits:
                dtype = _dequantized(dq, inits).dtype
                exact = source.get((node.name, index))
                array = exact.astype(dtype) if exact is not None else _dequantized(dq, inits)
                values = numpy_helper.from_array(array, f"{dq.output[0]}_float")
                out.graph.initializer.append(values)
                node.input[index] = values.name
    remove_dead_nodes(out)
    return out


def _original_constants(model: onnx.ModelProto) -> dict[tuple[str, int], np.ndarray]:
    """(node name, input index) -> the float initializer that input reads in the original graph."""
    inits = {i.name: i for i in model.graph.initializer}
    return {(n.name, k): numpy_helper.to_array(inits[name]) for n in model.graph.node
            for k, name in enumerate(n.input) if name in inits and inits[name].data_type == onnx.TensorProto.FLOAT}


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute("axis", axis)])


def constants_as_initializers(model: onnx.ModelProto) -> int:
    """Turn Constant nodes holding a tensor into initializers of the same name (in place); returns how many."""
    constants = [n for n in model.graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value"]
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
    return len(constants)


def quantize_constant_weights(model: onnx.ModelProto) -> int:
    """A fake-quantized module's export (QuantizeLinear of a float weight, then DequantizeLinear, perhaps a
    Transpose) as quantizers write graphs: DequantizeLinear of an int8 initializer, already transposed, its axis
    moved with it (in place). The int8 values are what QuantizeLinear computes (round half to even, saturate);
    returns how many weights. Graph-order assumptions: none; Q/DQ whose outputs have several readers stay."""
    constants_as_initializers(model)
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    producers = {o: n for n in model.graph.node for o in n.output}
    done = 0
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or not all(name in inits for name in q.input if name):
            continue
        q_values = _quantized(q, inits)
        values = numpy_helper.from_array(q_values, f"{q.output[0]}_int8")
        dq.input[0] = values.name
        transpose = next((n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == dq.output[0]), None)
        if transpose is not None and readers.get(dq.output[0]) == 1:
            perm = list(next(a.ints for a in transpose.attribute if a.name == "perm"))
            values = numpy_helper.from_array(np.ascontiguousarray(q_values.transpose(perm)), values.name)
            if numpy_helper.to_array(inits[dq.input[1]]).size > 1:
                _set_axis(dq, perm.index(_axis(dq) % q_values.ndim))
            dq.output[0], transpose.output[0] = transpose.output[0], dq.output[0]  # the Transpose is now dead
        model.graph.initializer.append(values)
        inits[values.name] = values
        done += 1
    remove_dead_nodes(model)
    return done


def _quantized(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """What a QuantizeLinear of constants computes: saturate(round_half_even(x / scale) + zero_point)."""
    x = numpy_helper.to_array(inits[q.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[_axis(q) % x.ndim] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    return np.clip(np.rint(x / scale) + zero.astype(np.float32), info.min, info.max).astype(zero.dtype)


def remove_identity_casts(model: onnx.ModelProto) -> int:
    """Remove Casts whose input already has the type they cast to (the exporter writes float -> float Casts
    around autocast regions); their readers read the input. Returns how many (in place)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] not in outputs
             and types.get(n.input[0]) == next(a.i for a in n.attribute if a.name == "to")]
    for cast in casts:
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name == cast.output[0]:
                    node.input[k] = cast.input[0]
    remove_dead_nodes(model)
    return len(casts)
