"""nn.Module -> ONNX artifact.

The graph takes `pixels` (N,3,H,W) float in [0,1] (normalization inside), and returns `logits`
(N,C,H,W) at the input resolution and/or an in-graph argmax `mask` (N,H,W) uint8. Opset 17 by
default: native LayerNormalization, attention decomposed into MatMul/Softmax (TensorRT-portable).

We export with torch's TorchScript-based exporter (`dynamo=False`): it writes the requested opset
directly (the dynamo exporter exports at 18 and silently keeps 18 when down-conversion fails) and takes
about 2 s for B0 instead of 22 s. Either way the opset actually written is checked.

Before anything is written, the exported graph is run in ONNX Runtime against PyTorch on a few inputs
and refused if its fp32 outputs differ beyond the fp32 parity preset.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vitseg_export import __version__
from vitseg_export.artifact import META_PREFIX, manifest_path
from vitseg_export.checkpoint import LoadedCheckpoint
from vitseg_export.files import atomic_write_bytes
from vitseg_export.errors import ParityError, VitsegError
from vitseg_export.modeling.registry import Segmenter
from vitseg_export.parity import ParityAccumulator, judge, thresholds_for

if TYPE_CHECKING:
    from vitseg_export.export.precision import Int8Settings

OUTPUT_CHOICES = ("logits", "mask", "both")
PRECISIONS = ("fp32", "fp16", "int8")
SUPPORTED_OPSETS = range(14, 22)


@dataclass
class OnnxExportSettings:
    precision: str = "fp32"
    opset: int = 17
    image_size: tuple[int, int] | None = None  # None: the checkpoint's
    dynamic_batch: bool = True
    dynamic_size: bool = False
    outputs: str = "logits"
    simplify: bool = False
    parity_inputs: int = 3
    fp16_io: bool = False
    fold: bool = True  # exact rewrites (vitseg_export.optimize); parity is still judged against the unfolded model

    @property
    def output_names(self) -> list[str]:
        return ["logits", "mask"] if self.outputs == "both" else [self.outputs]


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    model_proto: object = field(repr=False, default=None)


class ExportGraph(nn.Module):
    """Segmenter + the requested outputs, as the exported graph computes them."""

    def __init__(self, segmenter: Segmenter, outputs: list[str]):
        super().__init__()
        self.segmenter = segmenter
        self.outputs = outputs

    def forward(self, pixels: torch.Tensor):
        logits = self.segmenter(pixels)
        result = []
        if "logits" in self.outputs:
            result.append(logits)
        if "mask" in self.outputs:
            result.append(logits.argmax(1).to(torch.uint8))
        return tuple(result) if len(result) > 1 else result[0]


def check_export_request(loaded: LoadedCheckpoint, settings: OnnxExportSettings) -> tuple[int, int]:
    """Refuse what the model cannot honour; never change it silently. Returns the (H, W) to export at."""
    meta = loaded.meta
    if settings.outputs not in OUTPUT_CHOICES:
        raise VitsegError(f"--outputs {settings.outputs} is not one of {', '.join(OUTPUT_CHOICES)}")
    if settings.opset not in SUPPORTED_OPSETS:
        raise VitsegError(f"opset {settings.opset} is not supported", f"use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (17 recommended)")
    size = tuple(settings.image_size or meta.image_size)
    if meta.family == "vit":
        s = meta.config.image_size
        if settings.dynamic_size:
            raise VitsegError(f"{meta.architecture} cannot export with a dynamic size",
                              f"the ViT's position embedding fixes a {meta.config.grid_size}x{meta.config.grid_size} grid "
                              f"({s}x{s} px); drop --dynamic-size")
        p = meta.config.patch_size
        if size[0] % p or size[1] % p:
            raise VitsegError(f"image size {size[0]}x{size[1]} is not divisible by the patch size {p}",
                              f"use {s}x{s}")
        if size != (s, s):
            raise VitsegError(f"{meta.architecture} is built for {s}x{s} input, not {size[0]}x{size[1]}",
                              "the position embedding fixes the grid; retrain (or --init with resampling) at that size")
    if min(size) < 32:
        raise VitsegError(f"image size {size[0]}x{size[1]} is too small", "use at least 32x32")
    return size  # type: ignore[return-value]


def _to_onnx_bytes(graph: nn.Module, example: torch.Tensor, settings: OnnxExportSettings) -> bytes:
    dynamic_axes: dict[str, dict[int, str]] = {}
    if settings.dynamic_batch or settings.dynamic_size:
        axes_in = {}
        if settings.dynamic_batch:
            axes_in[0] = "batch"
        if settings.dynamic_size:
            axes_in.update({2: "height", 3: "width"})
        dynamic_axes["pixels"] = axes_in
        for name in settings.output_names:
            dims = {0: "batch"} if settings.dynamic_batch else {}
            if settings.dynamic_size:
                dims.update({1: "height", 2: "width"} if name == "mask" else {2: "height", 3: "width"})
            dynamic_axes[name] = dims
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic and the exporter deprecation note
        torch.onnx.export(graph, (example,), buffer, input_names=["pixels"], output_names=settings.output_names,
                          opset_version=settings.opset, dynamic_axes=dynamic_axes or None, do_constant_folding=True,
                          dynamo=False)
    return buffer.getvalue()


def _ort_session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def parity_inputs(size: tuple[int, int], count: int, batch: int, noise: bool = True) -> list[np.ndarray]:
    """Real images (the synthetic validation split) plus, for fp32, one uniform-noise batch (reduced
    precisions are judged on real images only: their ranges are calibrated for them)."""
    from vitseg_export.artifact import pixels_from_image
    from vitseg_export.data.sources import open_source

    source = open_source(f"synthetic[:{max(1, count)}]", "val")
    images = np.stack([pixels_from_image(source[i].image, size) for i in range(len(source))])
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    if noise:
        batches.append(np.random.default_rng(0).random((batch, 3, *size), dtype=np.float32))
    return batches


def self_parity(segmenter: Segmenter, session, batches: list[np.ndarray], outputs: list[str], precision: str = "fp32") -> dict:
    """Run the ONNX session against PyTorch; raise ParityError beyond the preset."""
    num_classes = segmenter.net.config.num_classes
    acc = ParityAccumulator(num_classes)
    for bi, pixels in enumerate(batches):
        with torch.inference_mode():
            ref = segmenter(torch.from_numpy(pixels)).numpy()
        feed = pixels.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else pixels
        got = dict(zip(outputs, session.run(None, {"pixels": feed})))
        for i in range(len(pixels)):
            art_logits = got["logits"][i].astype(np.float32) if "logits" in got else None
            art_mask = got["mask"][i] if "mask" in got else art_logits.argmax(0)
            if (precision == "fp32" and "logits" in got and "mask" in got
                    and not np.array_equal(got["mask"][i], art_logits.argmax(0))):
                raise ParityError("the exported mask output disagrees with the argmax of its own logits",
                                  "report this as a bug with the checkpoint")
            acc.add(f"batch{bi}_{i}", ref[i], art_mask, art_logits)
    summary = acc.summary()
    failures = judge(summary, thresholds_for(precision))
    if failures:
        hint = ("report this with the checkpoint; try another --opset" if precision == "fp32" else
                f"the {precision} graph loses too much; try another precision or calibration")
        raise ParityError(f"the exported {precision} graph differs from PyTorch: {'; '.join(failures)}; nothing was written",
                          hint)
    return summary


def export_onnx(loaded: LoadedCheckpoint, output: Path, settings: OnnxExportSettings,
                progress=lambda msg: None, int8: Int8Settings | None = None) -> ExportResult:
    import onnx

    from vitseg_export.export.precision import FP16_ISLANDS, Int8Settings, onnx_fp16, quantize_int8

    if settings.precision not in PRECISIONS:
        raise VitsegError(f"--precision {settings.precision} is unknown", f"use one of {', '.join(PRECISIONS)}")
    if settings.precision == "int8" and settings.outputs == "mask":
        raise VitsegError("int8 export needs the logits output (calibration and fallback compare logits)",
                          "use --outputs logits or both")
    size = check_export_request(loaded, settings)
    from vitseg_export.optimize import fold

    segmenter = loaded.segmenter().eval()  # the reference every parity check compares against
    rewrites: list[str] = []
    exported = segmenter
    if settings.fold:
        folded_net, rewrites = fold(loaded.model.eval())
        exported = Segmenter(folded_net, loaded.meta.mean, loaded.meta.std).eval()
    graph = ExportGraph(exported, settings.output_names).eval()
    # Dynamic batch needs a batch-2 example, or the batch dimension may specialize to 1.
    batch = 2 if settings.dynamic_batch else 1
    example = torch.rand(batch, 3, *size)
    progress(f"exporting {loaded.meta.architecture} to ONNX opset {settings.opset}")
    t0 = time.perf_counter()
    model_bytes = _to_onnx_bytes(graph, example, settings)
    model = onnx.load_from_string(model_bytes)
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != settings.opset:
        raise VitsegError(f"the exporter wrote opset {written}, not the requested {settings.opset}",
                          "use --opset {written} or report the model; vitseg does not ship a silently changed opset")
    if settings.simplify:
        model = _simplify(model, example.numpy(), settings.output_names, progress)
    progress("checking parity against PyTorch (ONNX Runtime CPU)")
    session = _ort_session(model.SerializeToString())
    batches = parity_inputs(size, settings.parity_inputs, batch)
    if settings.dynamic_size:  # also a size other than the export size, to prove the dynamic axes work
        other = (size[0] + 13, size[1] + 29)
        batches += parity_inputs(other, 1, batch)[:1]
    parity = self_parity(segmenter, session, batches, settings.output_names)
    fp32_parity = parity
    precision_info: dict = {}
    if settings.precision == "fp16":
        progress("converting to fp16 with fp32 islands")
        model = onnx_fp16(model, settings.fp16_io)
        precision_info = {"fp32_islands": list(FP16_ISLANDS), "io_dtype": "float16" if settings.fp16_io else "float32"}
    elif settings.precision == "int8":
        int8 = int8 or Int8Settings()
        result = quantize_int8(model, size, int8, cache_dir=output.parent / ".vitseg-calibration-cache", progress=progress)
        model = result.model
        precision_info = {"target": int8.target, "int8_mac_share": result.int8_mac_share,
                          "quantized_nodes": len(result.quantized_nodes), "fallback_layers": result.fallback,
                          "heldout_agreement": result.heldout_agreement,
                          "heldout_miou_vs_reference": result.heldout_miou_vs_reference, "calibration": result.calibration,
                          "quantization": result.settings,
                          "float_part": "fp16" if int8.target == "trt" else "fp32"}
    if settings.precision != "fp32":
        progress(f"checking {settings.precision} parity against PyTorch")
        real = parity_inputs(size, max(settings.parity_inputs, 8), batch, noise=False)
        parity = self_parity(segmenter, _ort_session(model.SerializeToString()), real, settings.output_names,
                             settings.precision)
    export_seconds = time.perf_counter() - t0

    meta = loaded.meta
    metadata = {
        "architecture": meta.architecture,
        "family": meta.family,
        "class_names": meta.class_names,
        "input_size": list(size),
        "normalization": {"mean": list(meta.mean), "std": list(meta.std)},
        "precision": settings.precision,
        "opset": written,
        "outputs": settings.output_names,
        "dynamic_batch": settings.dynamic_batch,
        "dynamic_size": settings.dynamic_size,
        "source_checkpoint": loaded.source,
        "source_sha256": loaded.sha256 or "",
        "vitseg_version": __version__,
    }
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=META_PREFIX + key, value=json.dumps(value))
    model.producer_name = "vitseg-export"
    model.producer_version = __version__
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    manifest = {
        "artifact": output.name,
        "format": "onnx",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "metadata": metadata,
        "export_settings": {**asdict(settings), "image_size": list(size), "exporter": "torch.onnx (TorchScript)",
                            "torch_version": torch.__version__, "onnx_version": onnx.__version__},
        "self_parity": parity,
        "rewrites": rewrites,
        "fp32_graph_parity": fp32_parity,
        settings.precision: precision_info,
        "export_seconds": round(export_seconds, 2),
        "random_weights": loaded.kind == "random",
    }
    atomic_write_bytes(output, data)
    atomic_write_bytes(manifest_path(output), (json.dumps(manifest, indent=2) + "\n").encode())
    return ExportResult(output, manifest, model)


def _simplify(model, example: np.ndarray, outputs: list[str], progress):
    """onnxslim, accepted only if it leaves the outputs unchanged (max |diff| <= 1e-5, identical masks)."""
    import onnxslim

    progress("simplifying with onnxslim")
    before = _ort_session(model.SerializeToString()).run(None, {"pixels": example})
    slim = onnxslim.slim(model)
    after = _ort_session(slim.SerializeToString()).run(None, {"pixels": example})
    for name, a, b in zip(outputs, before, after):
        if a.dtype.kind == "f":
            diff = float(np.abs(a.astype(np.float64) - b).max())
            if diff > 1e-5:
                raise ParityError(f"onnxslim changed '{name}' by up to {diff:.3g}; nothing was written", "export without --simplify")
        elif not np.array_equal(a, b):
            raise ParityError(f"onnxslim changed the '{name}' output; nothing was written", "export without --simplify")
    return slim
