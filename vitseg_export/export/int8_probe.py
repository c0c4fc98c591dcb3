"""Does int8 pay on this CPU, before anything is calibrated? A few-second probe: one layer of each op type that
vitseg quantizes, in fp32 and as ONNX Runtime's Q/DQ int8 (the same quantizer, symmetric, 7- or 8-bit weights
as the CPU class asks), timed alternately in the runtime the artifact is for. ONNX Runtime runs the Q/DQ graph
in its integer kernels; OpenVINO reads the same graph as FakeQuantize and runs its own int8 kernels, as it
does NNCF's IRs.

Without VNNI or AMX an int8 dot product is two AVX2 instructions per 32 products (vpmaddubsw + vpmaddwd),
about what fp32 FMAs cost, so int8 may not pay at all: the exporters ask `refusal` before calibrating and
stop with one line naming the CPU class and what to do. `scripts/bench_cpu.py` prints the whole table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from vitseg_export.cpu import SAFE_CLASS, cpu_class
from vitseg_export.errors import Int8NotWorthIt
from vitseg_export.export.quiet import library_output_on_stderr

# (op, input shape, what it stands for): one mid-sized layer each (1024 tokens x 512 features; 256 channels at
# 32x32), large enough that the kernels, not the call overhead, are timed
PROBE_LAYERS = {
    "matmul": ((1, 1024, 512), "FullyConnected/MatMul: attention projections and MLPs"),
    "conv1x1": ((1, 256, 32, 32), "the decode head's 1x1 convolutions"),
    "dwconv3x3": ((1, 256, 32, 32), "the Mix-FFN's depthwise 3x3 convolutions"),
}
DECIDING = ("matmul", "conv1x1")  # where most of the MACs are: int8 that pays on neither cannot pay
PAIRS = 12
# (serialized ONNX, whether it is the int8 graph) -> a function that runs it, as the runtime's runner would
Compile = Callable[[bytes, bool], Callable[[np.ndarray], object]]


def _layer(op: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, init = [], []
    if op == "matmul":
        init.append(numpy_helper.from_array(rng.standard_normal((shape[-1], shape[-1]), dtype=np.float32) * 0.05, "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
        out = list(shape)
    else:
        channels = shape[1]
        depthwise = op == "dwconv3x3"
        kernel = (channels, 1, 3, 3) if depthwise else (channels, channels, 1, 1)
        init += [numpy_helper.from_array(rng.standard_normal(kernel, dtype=np.float32) * 0.05, "w"),
                 numpy_helper.from_array(np.zeros(channels, np.float32), "b")]
        nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["y"], group=channels if depthwise else 1,
                                      pads=[1, 1, 1, 1] if depthwise else [0, 0, 0, 0]))
        out = list(shape)
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _Reader:
    def __init__(self, shape: tuple[int, ...]):
        self.batches = [np.random.default_rng(i).standard_normal(shape, dtype=np.float32) for i in range(2)]

    def get_next(self):
        return {"x": self.batches.pop()} if self.batches else None


def quantized_layer(model: onnx.ModelProto, shape: tuple[int, ...], made_for: str) -> onnx.ModelProto:
    """`model` through the quantizer vitseg's ONNX int8 uses (symmetric int8, Q/DQ), 7-bit weights for avx2."""
    with tempfile.TemporaryDirectory(prefix="vitseg-probe-") as work, library_output_on_stderr():
        src, dst = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), _Reader(shape), quant_format=QuantFormat.QDQ, per_channel=False,
                        reduce_range=made_for == SAFE_CLASS, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        return onnx.load(dst)


def _time(fp32: Callable, int8: Callable, x: np.ndarray) -> tuple[float, float]:
    for fn in (fp32, int8, fp32, int8):  # warm-up
        fn(x)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(PAIRS):
        for i, fn in enumerate((fp32, int8)):
            t0 = time.perf_counter()
            fn(x)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times[0])), float(np.median(times[1]))


def time_layers(compile_fn: Compile, runtime: str, made_for: str, ops: tuple[str, ...] = tuple(PROBE_LAYERS)) -> dict:
    """int8 against fp32, per op type, on this CPU in `runtime` (compiled by `compile_fn`), for int8 made for
    `made_for`: {"cpu_class", "runtime", "made_for", "ops": {op: {"shape", "fp32_ms", "int8_ms", "speedup"}}}."""
    rows = {}
    for op in ops:
        shape, _ = PROBE_LAYERS[op]
        fp32 = _layer(op, shape)
        int8 = quantized_layer(fp32, shape, made_for)
        x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
        fp32_ms, int8_ms = _time(compile_fn(fp32.SerializeToString(), False), compile_fn(int8.SerializeToString(), True), x)
        rows[op] = {"shape": list(shape), "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3),
                    "speedup": round(fp32_ms / int8_ms, 3)}
    return {"cpu_class": cpu_class(), "runtime": runtime, "made_for": made_for, "ops": rows}


def refusal(record: dict) -> str | None:
    """Why int8 cannot pay on this CPU (None: it may): int8 slower than fp32 on every deciding op type."""
    deciding = {op: row for op, row in record["ops"].items() if op in DECIDING}
    if not deciding or any(row["speedup"] >= 1.0 for row in deciding.values()):
        return None
    figures = ", ".join(f"{op} {row['speedup']:.2f}x" for op, row in deciding.items())
    return (f"int8 cannot pay on this {record['cpu_class']} CPU in {record['runtime']}: a probe of the layers that hold "
            f"most MACs ran int8 slower than fp32 ({figures})")


def check_int8_pays(settings, compile_fn: Compile, runtime: str) -> dict | None:
    """Before calibrating: where this machine is of the class the int8 is made for, probe it; Int8NotWorthIt
    (one line: the class, the figures, what to do) when int8 cannot pay, unless --allow-float-fallback.
    Returns the probe's record (None: this CPU is of another class, whose speed it says nothing about)."""
    if cpu_class() != settings.cpu_class:
        return None
    record = time_layers(compile_fn, runtime, settings.cpu_class, DECIDING)
    reason = refusal(record)
    if reason and not settings.allow_float_fallback:
        raise Int8NotWorthIt(reason, "export fp32 for this CPU, build for a VNNI target with --cpu-class vnni, or accept "
                                     "a slower int8 for its size with --allow-float-fallback")
    return record
