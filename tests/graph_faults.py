"""Faults written into exported ONNX graphs, for tests of where a verdict looks: each one exact at some shapes
and wrong at others."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def rewire_logits(model: onnx.ModelProto, nodes: list, initializers: list, raw: str = "logits_raw") -> onnx.ModelProto:
    """Rename the graph's `logits` to `raw` and append `nodes` (which read `raw` and write `logits`)."""
    for node in model.graph.node:
        node.output[:] = [raw if o == "logits" else o for o in node.output]
        node.input[:] = [raw if i == "logits" else i for i in node.input]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    return model


def mix_from_fifth(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each image's logits at batches 1 to 4 exactly; from the fifth image of a batch on, the logits of the image
    before it (a batch of 8 gets images 4..7 wrong): the fault a batcher's largest batches hit and batch 4 misses."""
    return rewire_logits(model, [
        helper.make_node("Shape", ["logits_raw"], ["raw_shape"]),
        helper.make_node("Gather", ["raw_shape", "zero"], ["n"], axis=0),
        helper.make_node("Range", ["zero", "n", "one"], ["index"]),
        helper.make_node("GreaterOrEqual", ["index", "four"], ["late"]),
        helper.make_node("Cast", ["late"], ["late_int"], to=TensorProto.INT64),
        helper.make_node("Sub", ["index", "late_int"], ["source"]),
        helper.make_node("Gather", ["logits_raw", "source"], ["logits"], axis=0),
    ], [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("zero", 0), ("one", 1), ("four", 4))])


def mix_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """logits + (mean over the batch - logits): exactly the logits at batch 1 (x - x = 0), the batch's mean
    logits inside a batch of several images (every image gets the same mask)."""
    return rewire_logits(model, [
        helper.make_node("ReduceMean", ["logits_raw"], ["batch_mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["batch_mean", "logits_raw"], ["pull"]),
        helper.make_node("Add", ["logits_raw", "pull"], ["logits"]),
    ], [])


def break_other_sizes(model: onnx.ModelProto, height: int, classes: int) -> onnx.ModelProto:
    """logits + 100 * (H - height) on class 0: exactly the logits at the metadata height, class 0 everywhere
    above it."""
    one_hot = np.zeros((1, classes, 1, 1), np.float32)
    one_hot[0, 0] = 100.0
    return rewire_logits(model, [
        helper.make_node("Shape", ["pixels"], ["pixels_shape"]),
        helper.make_node("Gather", ["pixels_shape", "h_index"], ["h"], axis=0),
        helper.make_node("Cast", ["h"], ["h_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["h_float", "h_exported"], ["h_offset"]),
        helper.make_node("Abs", ["h_offset"], ["h_distance"]),
        helper.make_node("Mul", ["h_distance", "class_zero"], ["shift"]),
        helper.make_node("Add", ["logits_raw", "shift"], ["logits"]),
    ], [numpy_helper.from_array(np.array(2, np.int64), "h_index"),
        numpy_helper.from_array(np.array(float(height), np.float32), "h_exported"),
        numpy_helper.from_array(one_hot, "class_zero")])
