"""The CPU emulation of a bf16 graph (runners/bf16_emulation.py) against PyTorch's own bf16 arithmetic on the
same values: a Linear + GELU + LayerNorm chain in bf16, each op's fp32 result rounded to bf16 (what a bf16 engine
stores between ops)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from vitseg_export.errors import VitsegError
from vitseg_export.runners.bf16_emulation import emulated, has_bf16


def _bf16_tensor(name: str, values: np.ndarray):
    bits = (torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    return helper.make_tensor(name, TensorProto.BFLOAT16, values.shape, bits.tobytes(), raw=True)


def _graph(w: np.ndarray, b: np.ndarray):
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["xb", "w"], ["y"]),
             helper.make_node("Add", ["y", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["r"]),
             helper.make_node("Cast", ["r"], ["out"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8])],
                              [_bf16_tensor("w", w), _bf16_tensor("b", b)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_emulation_rounds_like_torch_bf16():
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 16), (16, 8), (8,)))
    model = _graph(w, b)
    assert has_bf16(model)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):  # why it exists: the CPU provider has no bf16 MatMul
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run = emulated(model)
    assert not any(t.data_type == TensorProto.BFLOAT16 for t in run.graph.initializer)
    got = ort.InferenceSession(run.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tb = lambda a: torch.from_numpy(a).to(torch.bfloat16)  # noqa: E731
    expected = torch.relu(((tb(x).float() @ tb(w).float()).to(torch.bfloat16).float() + tb(b).float()).to(torch.bfloat16)).float()
    # every value a bf16 number, and PyTorch's rounding of each op (accumulation order may move one ulp)
    assert np.array_equal(got, torch.from_numpy(got).to(torch.bfloat16).float().numpy())
    ulp = np.abs(expected.numpy()) * 2.0 ** -7
    assert np.all(np.abs(got - expected.numpy()) <= ulp + 1e-30)
    assert not np.allclose(got, np.maximum(x @ w + b, 0), rtol=1e-6)  # rounded: not the fp32 result


def test_an_fp32_graph_has_no_bf16_and_bf16_io_is_refused():
    fp32 = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "f",
                                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert not has_bf16(fp32)
    io = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "b",
                                             [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
                                             [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])]))
    assert has_bf16(io)
    with pytest.raises(VitsegError, match="bf16 inputs or outputs"):
        emulated(io)
    assert onnx.checker.check_model(emulated(_graph(np.ones((16, 8), np.float32), np.ones(8, np.float32)))) is None
