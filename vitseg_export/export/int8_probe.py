"""Does int8 pay on this CPU? Asked of the whole graph, before anything is calibrated, and decided by the one
timing rule (vitseg_export/timing.py: interleaved pairs, a confidence interval, a margin), so that the same
export gives the same answer on a shared machine.

- before calibrating: the exporter builds the int8 graph with placeholder ranges (an int8 graph's speed does not
  depend on its ranges: the same Q/DQ placement runs the same kernels) and `speed_decision` times it against
  the fp32 graph; int8 measurably slower refuses the export in seconds (Int8NotWorthIt, exit 3);
- after the fallback, only when it returned layers to float (a different graph), the same question again.

Judged only where this CPU is of the class the int8 is made for: on another class its speed says nothing about
the target's (recorded where the arithmetic is exact here, not judged).

`time_layers` is the per-op diagnostic behind scripts/bench_cpu.py: one layer of each op type vitseg
quantizes, fp32 against ONNX Runtime's Q/DQ int8, by the same rule. Without VNNI or AMX an int8 dot product is
two AVX2 instructions per 32 products (vpmaddubsw + vpmaddwd), about what fp32 FMAs cost: it shows why.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from vitseg_export.errors import Int8NotWorthIt
from vitseg_export.export.quiet import library_output_on_stderr
from vitseg_export.machine.cpu import SAFE_CLASS, classes_exact_for, cpu_class, int8_exact_here
from vitseg_export.machine.timing import SLOWER, compare_speed
from vitseg_export.progress import Progress
from vitseg_export.runners.base import INPUT_NAME, Runner

# (op, input shape, what it stands for): one mid-sized layer each (1024 tokens x 512 features; 256 channels at
# 32x32), large enough that the kernels, not the call overhead, are timed
PROBE_LAYERS = {
    "matmul": ((1, 1024, 512), "FullyConnected/MatMul: attention projections and MLPs"),
    "conv1x1": ((1, 256, 32, 32), "the decode head's 1x1 convolutions"),
    "dwconv3x3": ((1, 256, 32, 32), "the Mix-FFN's depthwise 3x3 convolutions"),
}
# (serialized ONNX, whether it is the int8 graph) -> a function that runs it, as the runtime's runner would
Compile = Callable[[bytes, bool], Callable[[np.ndarray], object]]
PLACEHOLDER_RANGE = 4.0  # |x| the placeholder ranges cover: any finite, non-zero range runs the same kernels


def _layer(op: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, init = [], []
    if op == "matmul":
        init.append(numpy_helper.from_array(rng.standard_normal((shape[-1], shape[-1]), dtype=np.float32) * 0.05, "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    else:
        channels = shape[1]
        depthwise = op == "dwconv3x3"
        kernel = (channels, 1, 3, 3) if depthwise else (channels, channels, 1, 1)
        init += [numpy_helper.from_array(rng.standard_normal(kernel, dtype=np.float32) * 0.05, "w"),
                 numpy_helper.from_array(np.zeros(channels, np.float32), "b")]
        nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["y"], group=channels if depthwise else 1,
                                      pads=[1, 1, 1, 1] if depthwise else [0, 0, 0, 0]))
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def placeholder_ranges(model: onnx.ModelProto, path: Path) -> Path:
    """An ONNX Runtime calibration cache at `path` giving every activation of `model` the placeholder range
    +-PLACEHOLDER_RANGE: `quantize_static` reads it instead of calibrating (no inference at all)."""
    initializers = {i.name for i in model.graph.initializer}
    names = {name for node in model.graph.node for name in (*node.input, *node.output) if name and name not in initializers}
    names |= {i.name for i in model.graph.input}
    data = {name: TensorData(lowest=np.float32(-PLACEHOLDER_RANGE), highest=np.float32(PLACEHOLDER_RANGE))
            for name in sorted(names)}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
    return path


def quantized_layer(model: onnx.ModelProto, made_for: str) -> onnx.ModelProto:
    """A single layer through the quantizer vitseg's ONNX int8 uses (symmetric int8, Q/DQ, placeholder ranges),
    7-bit weights for avx2."""
    with tempfile.TemporaryDirectory(prefix="vitseg-probe-") as work, library_output_on_stderr():
        src, dst = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=False,
                        reduce_range=made_for == SAFE_CLASS, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=placeholder_ranges(model, Path(work) / "ranges.json"),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        return onnx.load(dst)


def time_layers(compile_fn: Compile, runtime: str, made_for: str, ops: tuple[str, ...] = tuple(PROBE_LAYERS)) -> dict:
    """int8 against fp32, per op type, on this CPU in `runtime` (compiled by `compile_fn`), for int8 made for
    `made_for`: {"cpu_class", "runtime", "made_for", "ops": {op: SpeedComparison.to_json() + "shape"}}."""
    rows = {}
    for op in ops:
        shape, _ = PROBE_LAYERS[op]
        fp32 = _layer(op, shape)
        x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
        run_fp32 = compile_fn(fp32.SerializeToString(), False)
        run_int8 = compile_fn(quantized_layer(fp32, made_for).SerializeToString(), True)
        rows[op] = {"shape": list(shape), **compare_speed(partial(run_fp32, x), partial(run_int8, x)).to_json()}
    return {"cpu_class": cpu_class(), "runtime": runtime, "made_for": made_for, "ops": rows}


def announce_emulation(made_for: str, progress: Progress) -> None:
    """Say once, in an export's progress, that its int8 graphs run emulated here (`made_for`: the class, "" for 8-bit
    int8 of no class): the runners of its in-memory graphs do not warn each time."""
    if not int8_exact_here(made_for):
        progress(f"int8: this {cpu_class()} CPU's integer kernels would saturate 8-bit int8: judging it with its int8 "
                 "arithmetic emulated in float (exact, slower)")


def not_timed_here(settings) -> str | None:
    """Why int8 made for `settings.cpu_class` is not timed on this CPU (None: it is): its speed is measured only
    where its integer arithmetic is exact."""
    here = cpu_class()
    if here not in classes_exact_for(settings.cpu_class):
        return f"not timed: int8 made for {settings.cpu_class} is not exact on this {here} CPU"
    return None


def speed_decision(fp32: Runner, int8: Runner, size: tuple[int, int], settings, stage: str) -> dict:
    """Time the int8 graph against its format's fp32 graph (batch 1, inactive runners, activated here) by the
    timing rule; call it where `not_timed_here` is None. On a CPU of the class the int8 is made for the outcome
    is judged: "slower" raises Int8NotWorthIt (one line: the figures, the rule, what to do) unless
    --allow-float-fallback; on another class it is recorded only. Returns the record. `stage`: when ("before
    calibration", "after the fallback")."""
    here = cpu_class()
    feed = {INPUT_NAME: np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)}
    with fp32.taking_turns(), int8.taking_turns():
        comparison = compare_speed(lambda: fp32.infer(feed), lambda: int8.infer(feed))
    judged = here == settings.cpu_class
    record = {"stage": stage, "cpu_class": here, "judged": judged, **comparison.to_json()}
    if judged and comparison.outcome == SLOWER and not settings.allow_float_fallback:
        hint = ("export fp32 for this CPU" + (", build for a VNNI target with --cpu-class vnni" if here == SAFE_CLASS else "")
                + ", try `vitseg qat`, or accept it for its size with --allow-float-fallback")
        raise Int8NotWorthIt(f"int8 is slower than fp32 on this {here} CPU it is made for ({stage}): "
                             f"{comparison.describe()}", hint)
    return record
