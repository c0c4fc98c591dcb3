"""Static check of an ONNX graph against the TensorRT ONNX parser, runnable where TensorRT is not.

The table follows onnx-tensorrt's `docs/operators.md` (the parser's supported-operator list, TensorRT
10.x / 11.x) for the ops vitseg graphs can contain; an op missing from the table is reported as
unsupported rather than assumed to work. Attribute rules are the restrictions that list states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

# Ops the parser supports (subset relevant to segmentation graphs), with the dtypes the list gives.
SUPPORTED_OPS = {
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum", "DequantizeLinear", "Div", "Dropout",
    "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GroupNormalization", "HardSigmoid",
    "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow",
    "PRelu", "QuantizeLinear", "Range", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "Relu", "Reshape", "Resize", "Round", "ScatterElements", "ScatterND", "Shape",
    "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
    "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Upsample", "Where", "Xor",
}
# Supported from a given opset/TensorRT version only.
VERSIONED_OPS = {"Attention": "opset 23; parsed from TensorRT 10.14 on (4-D Q/K/V, no past/present)"}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATE_MODES = {"half_pixel", "pytorch_half_pixel", "asymmetric", "align_corners", "tf_half_pixel_for_nn"}
PARSER_OPSETS = range(9, 26)  # 9..24 in 10.15, 25 in 11.x


@dataclass(frozen=True)
class LintProblem:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def lint_for_tensorrt(model: onnx.ModelProto) -> list[LintProblem]:
    """Every node (and the opset) the TensorRT ONNX parser would reject, with the reason; empty means clean."""
    problems: list[LintProblem] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset not in PARSER_OPSETS:
        problems.append(LintProblem("<model>", "opset", f"opset {opset} is outside the parser's {PARSER_OPSETS.start}..{PARSER_OPSETS.stop - 1}"))
    constants = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            constants[n.output[0]] = n
    consumed = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for n in model.graph.node:
        name = n.name or n.output[0]
        if n.domain not in ("", "ai.onnx"):
            problems.append(LintProblem(name, n.op_type, f"custom domain '{n.domain}' needs a TensorRT plugin"))
            continue
        if n.op_type in VERSIONED_OPS:
            problems.append(LintProblem(name, n.op_type, f"only supported with {VERSIONED_OPS[n.op_type]}; export at opset 17"))
            continue
        if n.op_type not in SUPPORTED_OPS:
            problems.append(LintProblem(name, n.op_type, "not in the TensorRT ONNX parser's supported operators"))
            continue
        if n.op_type == "Resize":
            mode = _attr(n, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            coord = _attr(n, "coordinate_transformation_mode", b"half_pixel")
            coord = coord.decode() if isinstance(coord, bytes) else coord
            if mode not in RESIZE_MODES:
                problems.append(LintProblem(name, n.op_type, f"mode '{mode}' (TensorRT: nearest or linear)"))
            if coord not in RESIZE_COORDINATE_MODES:
                problems.append(LintProblem(name, n.op_type, f"coordinate_transformation_mode '{coord}' unsupported"))
            if _attr(n, "antialias", 0):
                problems.append(LintProblem(name, n.op_type, "antialias is not supported"))
        elif n.op_type in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin") and len(n.input) > 1 and n.input[1]:
            if n.input[1] not in constants:
                problems.append(LintProblem(name, n.op_type, "axes must be a constant"))
        elif n.op_type in ("Unsqueeze", "Squeeze") and len(n.input) > 1 and n.input[1] not in constants:
            problems.append(LintProblem(name, n.op_type, "axes must be a constant"))
        elif n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in constants:
            zp = constants[n.input[2]]
            arr = onnx.numpy_helper.to_array(zp) if isinstance(zp, onnx.TensorProto) else \
                onnx.numpy_helper.to_array(_attr(zp, "value"))
            if np.any(arr != 0):
                problems.append(LintProblem(name, n.op_type, "zero point must be 0 (TensorRT quantization is symmetric)"))
        elif n.op_type == "DequantizeLinear" and n.input[0] in constants:
            src = constants[n.input[0]]
            if isinstance(src, onnx.TensorProto) and src.data_type == onnx.TensorProto.INT32:
                problems.append(LintProblem(name, n.op_type, "int32 input (quantized bias) is not accepted; export with --target trt"))
        elif n.op_type == "LayerNormalization" and any(o in consumed for o in n.output[1:] if o):
            problems.append(LintProblem(name, n.op_type, "only the first output (Y) is supported"))
    return problems
