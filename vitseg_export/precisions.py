"""The one table of precisions: the converter that turns vitseg's verified fp32 ONNX graph into each
precision, the parity preset that judges the result, and what a TensorRT build needs. The CLI's
choices, the benchmark matrix, export, verify and the TensorRT builder read it; a new precision is one
`register_precision(...)` row (plus its converter module).

Why the presets are what they are:
- fp32: the same math in another runtime. Kernel order changes leave logits within ~1e-5 of each
  other; a flipped argmax can only happen at near-ties, so agreement must be >= 99.99% and the largest
  logit difference <= 1e-3 (100x the observed noise: anything above is a real graph difference).
- fp16: 10-bit mantissa, so logits of magnitude ~10 move by ~1e-2; a pixel flips only where the top-2
  margin is below that. Agreement >= 99.9% and mIoU against the reference >= 99.5%; logit limits are
  loose (max 0.5, mean 0.05) to catch overflow and broken islands, not rounding.
- int8: quantization noise is a few percent of each activation range; the mask is what must survive:
  agreement >= 99.0% and mIoU against the reference >= 98.0%; no logit limit beyond finiteness.
- bf16: an 8-bit mantissa, about 8x fp16's rounding; measured OpenVINO bf16 IRs of trained B0s agree 99.92-99.97%
  (mIoU 99.6-99.9): agreement >= 99.5% and mIoU >= 99.0, logits within 1.0 (mean 0.1), as loose as the rounding and no
  looser than a broken layer allows.
Every preset requires zero non-finite values. Batch consistency (each image alone vs inside a batch of others)
holds fp32 logits to the fp32 logit limit and reduced precisions' masks to their preset's agreement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from vitseg_export.progress import Progress, silent
from vitseg_export.tables import Table, lazy


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must meet against its reference: one preset per precision, overridable per run."""

    min_agreement: float
    min_miou_vs_reference: float
    max_abs_logit_diff: float | None
    max_mean_abs_logit_diff: float | None
    max_nonfinite: int = 0


def thresholds_dict(t: Thresholds) -> dict:
    """The JSON form of a set of thresholds."""
    return asdict(t)


@dataclass(frozen=True)
class ConversionContext:
    """What a converter may need besides the graph."""

    image_size: tuple[int, int]
    int8: Any = None  # vitseg_export.settings.Int8Settings
    fp16_io: bool = False
    cache_dir: Path | None = None
    progress: Progress = silent
    data: str = "synthetic"  # the spec whose calib split fp16's range measurement runs on
    keep_float: tuple[str, ...] = ()  # modules to keep in float (--keep-float), found in the graph through `scopes`
    scopes: Any = None  # vitseg_export.modeling.scopes.ModuleScopes of the exported module
    # () -> (the verdict's real images, the reference's recorded logits on them): what a calibrated precision's
    # fallback decides on, so that its held-out figures are the final verdict's (ExportSession.heldout)
    heldout: Callable[[], Any] | None = None


@dataclass
class Conversion:
    """A converted graph, the manifest section that describes the conversion, and files to write with the
    artifact (in the same all-or-nothing group: int8's calibration cache)."""

    model: Any  # onnx.ModelProto
    details: dict
    files: dict = field(default_factory=dict)  # Path -> bytes


@dataclass(frozen=True)
class Precision:
    """One precision and everything that differs by precision; callers ask the row, never compare names."""

    name: str
    thresholds: Thresholds  # the parity preset every artifact of this precision is judged by
    convert: Callable[[Any, ConversionContext], Conversion] | None  # ONNX converter ("module:attr"); None: fp32 as is
    trt_weak_flags: tuple[str, ...]  # TensorRT 10.x BuilderFlags for the weakly typed fallback
    # also judged on uniform noise, for finiteness and logit ranges only (reduced precisions are calibrated for images)
    parity_on_noise: bool
    needs_logits: bool  # the conversion compares logits (int8 calibration and fallback)
    description: str
    # batch consistency (an image alone vs inside a batch): the same math must give the same logits whatever the
    # batch (within the logit limit); reduced precisions may round differently per batch, so their masks are
    # held to the preset's agreement instead
    consistent_logits: bool = False
    masks_match_logits: bool = False  # an in-graph `mask` must equal the argmax of the graph's own logits
    calibrated: bool = False  # its targets are the user's (--min-agreement), met by calibration and fallback
    baseline: bool = False  # the precision the others are measured against ("slower than fp32 here")
    # its graphs run integer kernels, whose results depend on the CPU class (vitseg_export/machine/cpu.py): runners emulate
    # them in float where they would not be exact
    integer_kernels: bool = False
    parity_hint: str = "try another precision or calibration"  # what to do when its self-parity fails
    openvino_compress_to_fp16: bool = False  # an IR of it stores fp16 weights
    openvino_inference_precision: str = "f32"  # what an IR of it computes in, where the device has it
    openvino_quantize: Callable[..., Any] | None = None  # turns the fp32 IR into this precision ("module:attr")
    describe: Callable[[dict], list[str]] | None = None  # lines on its manifest section for `vitseg export`
    # `vitseg verify --locate`: the SQNR (dB) an intermediate tensor keeps against PyTorch's at every boundary of an
    # honest artifact of this precision (below it: the first divergence)
    locate_sqnr_db: float = 60.0
    options: tuple[str, ...] = ()  # the `vitseg export` options that apply to this precision alone
    trt_fp32_gemm: bool = False  # its TensorRT graphs multiply matrices in fp32 (TensorRT-RTX has none on Turing)
    trt_bf16: bool = False  # its TensorRT graphs compute in bf16 (tensor cores from Ampere, compute capability 8.0, on)
    # how many real held-out images an export's verdict rests on unless asked otherwise (every verdict states it);
    # a calibrated precision's fallback decides on them too, so it takes more
    verdict_images: int = 16
    # where it is offered, when not every format carries it (formats.py `precisions`): what a refusal says, and its fix
    offered_where: tuple[str, str] | None = None

    def consistency(self, thresholds: Thresholds | None = None) -> Thresholds:
        """The batch-consistency limits, from `thresholds` (default: the preset): the agreement and, where
        logits must match, the largest logit difference."""
        t = thresholds or self.thresholds
        return Thresholds(t.min_agreement, 0.0, t.max_abs_logit_diff if self.consistent_logits else None, None)

    def export_thresholds(self, targets: Thresholds | None = None) -> Thresholds:
        """What its self-parity at export holds a graph to: the preset, with a calibrated precision's agreement
        and mIoU targets as the user set them (`targets`, e.g. Int8Settings.targets())."""
        if self.calibrated and targets is not None:
            return replace(self.thresholds, min_agreement=targets.min_agreement,
                           min_miou_vs_reference=targets.min_miou_vs_reference)
        return self.thresholds

    def openvino_weights(self) -> str:
        """How an IR of this precision stores its weights (the manifest's `weights`): fp16 compressed, int8 from the
        quantizer, else the fp32 weights (a bf16 IR's are rounded by OpenVINO when it compiles them)."""
        if self.openvino_compress_to_fp16:
            return "fp16 (compressed)"
        return self.name if self.openvino_quantize is not None else "fp32"


PRECISIONS: Table[Precision] = Table("precision '{name}' is unknown", "use one of: {names}")
# Add a row (CLI choices, benchmark matrix and verify presets follow) / the row of a name (one-line error).
register_precision = PRECISIONS.register
get_precision = PRECISIONS.row


register_precision(Precision(
    "fp32", Thresholds(min_agreement=0.9999, min_miou_vs_reference=0.999, max_abs_logit_diff=1e-3,
                       max_mean_abs_logit_diff=1e-4),
    convert=None, trt_weak_flags=(), parity_on_noise=True, needs_logits=False,
    description="the exported graph as is", consistent_logits=True, masks_match_logits=True, baseline=True,
    trt_fp32_gemm=True,
    # the same math: honest fp32 artifacts keep 124-137 dB at every boundary (trained B0 at 128, ONNX and IR)
    locate_sqnr_db=60.0,
    parity_hint="report this with the checkpoint; try another --opset"))
register_precision(Precision(
    "fp16", Thresholds(min_agreement=0.999, min_miou_vs_reference=0.995, max_abs_logit_diff=0.5,
                       max_mean_abs_logit_diff=0.05),
    convert=lazy("vitseg_export.export.fp16:fp16_conversion"), trt_weak_flags=("FP16",), parity_on_noise=False,
    needs_logits=False, description="fp16 weights and activations with fp32 islands",
    # 10-bit mantissas: honest fp16 artifacts keep 62-75 dB (trained B0 at 128, ONNX AutoCast and IR)
    locate_sqnr_db=40.0,
    openvino_compress_to_fp16=True, openvino_inference_precision="f16", options=("fp16_io",),
    describe=lazy("vitseg_export.export.fp16:describe_fp16")))
register_precision(Precision(
    "int8", Thresholds(min_agreement=0.99, min_miou_vs_reference=0.98, max_abs_logit_diff=None,
                       max_mean_abs_logit_diff=None),
    convert=lazy("vitseg_export.export.int8:int8_conversion"), trt_weak_flags=("FP16", "INT8"), parity_on_noise=False,
    needs_logits=True, description="calibrated int8 Q/DQ with sensitivity-driven float fallback",
    calibrated=True, integer_kernels=True, verdict_images=32,
    # honest int8 artifacts keep 31-47 dB at every boundary (trained B0 at 128: ONNX for CPUs and for TensorRT, the
    # NNCF IR with its bf16 float part); a broken layer or a saturating one falls far below
    locate_sqnr_db=20.0, parity_hint="the int8 graph loses too much; calibrate on more representative images, or use fp16",
    # int8 IRs compute their float part in bf16 where the CPU has it, as TensorRT's int8 graphs are fp16 there
    openvino_inference_precision="bf16", openvino_quantize=lazy("vitseg_export.export.openvino_export:quantize_ir"),
    describe=lazy("vitseg_export.export.fallback:describe_int8"),
    options=("calib", "heldout", "calib_images", "calib_method", "target", "min_agreement", "allow_float_fallback")))

register_precision(Precision(
    # measured (docs/benchmarks.md "bf16"): an 8-bit mantissa moves logits of magnitude ~10 by ~0.05 and flips pixels
    # only at near-ties, as fp16 does, three bits coarser
    "bf16", Thresholds(min_agreement=0.995, min_miou_vs_reference=0.99, max_abs_logit_diff=1.0,
                       max_mean_abs_logit_diff=0.1),
    # TensorRT: a bf16 ONNX graph (AutoCast), built strongly typed; ONNX Runtime's CPU provider runs it emulated
    convert=lazy("vitseg_export.export.fp16:bf16_conversion"), trt_weak_flags=("BF16",), parity_on_noise=False,
    needs_logits=False, description="bf16 compute: OpenVINO IRs on CPUs with AVX512_BF16 or AMX, TensorRT engines on "
                                    "GPUs from Ampere on",
    locate_sqnr_db=30.0, openvino_inference_precision="bf16", trt_bf16=True,
    describe=lazy("vitseg_export.export.fp16:describe_fp16"),
    offered_where=("bf16 is made as an OpenVINO IR (CPUs with AVX512_BF16 or AMX) or a TensorRT engine (GPUs from Ampere "
                   "on); as a plain ONNX artifact ONNX Runtime's CPU provider has no bf16 kernels to run it with",
                   "use --format openvino, trt or trt-rtx with --precision bf16, or --precision fp16 for ONNX")))


def thresholds_for(precision: str, **overrides: float | None) -> Thresholds:
    """The parity preset of `precision`, with single limits overridden where a value is given."""
    return replace(get_precision(precision).thresholds, **{k: v for k, v in overrides.items() if v is not None})
