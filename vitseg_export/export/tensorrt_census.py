"""What a parsed TensorRT network computes in: its Convolution and MatrixMultiply layers, and their MACs, by the
type they compute in (int8 / fp16 / fp32 / bf16), read from the network TensorRT's own ONNX parser built, before
any engine exists; and every Q/DQ pair TensorRT would run in float.

In a strongly typed network a layer computes in the type of its inputs, and TensorRT fuses DequantizeLayer ->
Convolution / MatrixMultiply into an int8 kernel when every data input of the layer is dequantized. The parser
puts layout-only layers between them that are not in the ONNX (a Shuffle broadcasting a MatMul's weight, a
Squeeze or Unsqueeze): a layer's inputs are followed back through those to the layer that really produces them.
A layer with some but not all inputs dequantized computes in float: its Q/DQ pairs are recorded as such, and so
is every dequantized tensor that (through layout-only layers) also feeds a float layer (not a Shape): there
TensorRT rounds the float value to int8 and back (a LayerNorm or residual Add reading an int8-rounded input).

Works for both TensorRT editions (the network API is shared); where a GPU builds and runs the engine, the engine
inspector's per-layer precision is the fuller answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # mypy checks every call against the TensorRT 10.3 and 11.4 bindings (tests/test_trt_typing.py)
    import tensorrt as trt
else:  # the module of the edition chosen with `using(edition)`
    from vitseg_export.runners.tensorrt_editions import trt

TYPE_NAMES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT8": "int8", "FP8": "fp8", "INT4": "int4", "FP4": "fp4"}


def _type_name(dtype: Any) -> str:
    name = str(dtype).rsplit(".", 1)[-1]
    return TYPE_NAMES.get(name, name.lower())


class _Network:
    """A parsed network's layers, with who produces and who reads each tensor, looked through the layout-only
    layers the parser inserts."""

    def __init__(self, network: Any):
        self.layers = [network.get_layer(i) for i in range(network.num_layers)]
        self.producer = {layer.get_output(j).name: layer for layer in self.layers for j in range(layer.num_outputs)}
        self.consumers: dict[str, list] = {}
        for layer in self.layers:
            for i in range(layer.num_inputs):
                tensor = layer.get_input(i)
                if tensor is not None:
                    self.consumers.setdefault(tensor.name, []).append(layer)
        # Squeeze and Unsqueeze layers exist from TensorRT 10.8 (not in JetPack 6's 10.3)
        self.layout_only = {trt.LayerType.SHUFFLE,
                            *(getattr(trt.LayerType, n) for n in ("SQUEEZE", "UNSQUEEZE") if hasattr(trt.LayerType, n))}
        self.compute = {trt.LayerType.CONVOLUTION, trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.DECONVOLUTION}

    def source(self, tensor: Any) -> Any:
        """The layer that produces `tensor`, looked through layout-only layers (their data input is input 0)."""
        layer = self.producer.get(tensor.name)
        while layer is not None and layer.type in self.layout_only and layer.get_input(0) is not None:
            layer = self.producer.get(layer.get_input(0).name)
        return layer

    def final_consumers(self, tensor: Any) -> list:
        """The layers that read `tensor`, looked through layout-only layers."""
        found, todo = [], list(self.consumers.get(tensor.name, []))
        while todo:
            layer = todo.pop()
            if layer.type in self.layout_only:
                todo += self.consumers.get(layer.get_output(0).name, [])
            else:
                found.append(layer)
        return found

    def dequantized_into_float(self) -> dict[str, int]:
        """Float layers (by kind) that read a dequantized tensor: TensorRT rounds their input to int8 and back."""
        into_float: dict[str, int] = {}
        for layer in self.layers:
            if layer.type != trt.LayerType.DEQUANTIZE:
                continue
            for consumer in self.final_consumers(layer.get_output(0)):
                # a Shape reads no values; a Quantize re-quantizes (int8 moved through a layout op)
                if consumer.type not in self.compute and consumer.type not in (trt.LayerType.SHAPE, trt.LayerType.QUANTIZE):
                    kind = str(consumer.type).rsplit(".", 1)[-1]
                    into_float[kind] = into_float.get(kind, 0) + 1
        return into_float

    def compute_rows(self, macs: dict[str, int]) -> tuple[list[dict], list[str]]:
        """One row per Conv / MatMul layer with the type it computes in, and the names of those TensorRT runs in
        float although some (not all) of their data inputs are dequantized."""
        rows, partial = [], []
        for layer in self.layers:
            if layer.type not in self.compute:
                continue
            data = [layer.get_input(i) for i in range(min(layer.num_inputs, 2)) if layer.get_input(i) is not None]
            dequantized = [self.source(t) for t in data]
            dequantized = [d for d in dequantized if d is not None and d.type == trt.LayerType.DEQUANTIZE]
            if data and len(dequantized) == len(data):
                computes_in = _type_name(dequantized[0].get_input(0).dtype)  # the quantized type the pair carries
            else:
                computes_in = _type_name(data[0].dtype if data else layer.get_output(0).dtype)
                if dequantized:
                    partial.append(layer.name)
            rows.append({"name": layer.name, "type": str(layer.type).rsplit(".", 1)[-1], "computes_in": computes_in,
                         "macs": macs.get(layer.name)})
        return rows, partial


def _by_type(rows: list[dict]) -> dict[str, dict]:
    total = sum(r["macs"] or 0 for r in rows)
    by_type: dict[str, dict] = {}
    for row in rows:
        entry = by_type.setdefault(row["computes_in"], {"layers": 0, "macs": 0})
        entry["layers"] += 1
        entry["macs"] += row["macs"] or 0
    for entry in by_type.values():
        entry["mac_share"] = round(entry["macs"] / total, 4) if total else None
    return by_type


def network_census(network: Any, macs: dict[str, int] | None = None) -> dict:
    """The census of a parsed network (`macs`: MACs per ONNX node name, which the parser gives its layers; None
    or missing names: counted as unknown). JSON-ready: {"by_type": {type: {"layers", "macs", "mac_share"}},
    "layers": [{"name", "type", "computes_in", "macs"}], "float_with_dequantized_input": [names],
    "dequantize_layers", "quantize_layers"}."""
    graph = _Network(network)
    rows, partial = graph.compute_rows(macs or {})
    return {"by_type": _by_type(rows), "layers": rows, "float_with_dequantized_input": partial,
            "dequantized_into_float_layers": graph.dequantized_into_float(),
            "macs_unknown": [r["name"] for r in rows if r["macs"] is None],
            "dequantize_layers": sum(layer.type == trt.LayerType.DEQUANTIZE for layer in graph.layers),
            "quantize_layers": sum(layer.type == trt.LayerType.QUANTIZE for layer in graph.layers)}


def describe_census(census: dict) -> str:
    """One line: 'parsed network: int8 48 layers (93.1% of MACs), fp16 16 (6.9%); 0 Q/DQ pairs run in float'."""
    parts = []
    for kind, entry in sorted(census["by_type"].items(), key=lambda kv: -(kv[1]["macs"] or 0)):
        share = f" ({entry['mac_share'] * 100:.1f}% of MACs)" if entry["mac_share"] is not None else ""
        parts.append(f"{kind} {entry['layers']} layers{share}")
    partial = census["float_with_dequantized_input"]
    into_float = census["dequantized_into_float_layers"]
    line = (f"parsed network computes in: {', '.join(parts) or 'no Conv/MatMul layers'}; {len(partial)} Conv/MatMul "
            "layers with Q/DQ inputs TensorRT runs in float" + (f" (first: {partial[0]})" if partial else ""))
    if into_float:
        line += ("; dequantized tensors also read by float layers: "
                 + ", ".join(f"{kind} {count}" for kind, count in sorted(into_float.items(), key=lambda kv: -kv[1])))
    return line
