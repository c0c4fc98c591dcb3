"""fp32 ONNX -> fp16 ONNX: onnxruntime's `convert_float_to_float16`, with fp32 islands where fp16 is
unsafe (below), fp32 graph inputs/outputs unless `fp16_io`. Precision is decided in the graph itself,
so every backend (ONNX Runtime, strongly typed TensorRT) runs exactly what the graph states.
"""

from __future__ import annotations

import copy

import onnx

# fp32 islands in fp16 graphs. LayerNormalization: the mean/variance of 768-wide ViT tokens overflow
# fp16's 65504 when squared (the well-known TensorRT ViT failure); ReduceMean/Pow/Sqrt cover decomposed
# norms. Softmax: exp-sum accumulation over long sequences (SegFormer stage 1 has H/4*W/4 queries).
# Resize stays fp32: it produces the full-resolution logits the argmax reads.
FP16_ISLANDS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Resize")


def onnx_fp16(model: onnx.ModelProto, fp16_io: bool = False, islands: tuple[str, ...] = FP16_ISLANDS) -> onnx.ModelProto:
    """A converted copy of `model`: fp16 everywhere except the op types in `islands`; float32 graph I/O
    unless `fp16_io`. The input model is not modified."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=not fp16_io, op_block_list=list(islands))
    _dedupe_casts(converted)
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends its Casts at the end; ONNX requires sorted nodes
    return wrapped.model


def _dedupe_casts(model: onnx.ModelProto) -> None:
    """The converter inserts one Cast per blocked consumer of a tensor, all with the same node and output
    name; identical ones are one Cast (kept once), so the graph stays valid SSA."""
    seen: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in model.graph.node:
        if node.name in seen:
            first = seen[node.name]
            if (node.op_type, list(node.input), list(node.output)) == (first.op_type, list(first.input), list(first.output)):
                continue
            node.name = f"{node.name}_{len(keep)}"
        seen[node.name] = node
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
