"""What an export is asked to do: plain dataclasses (torch-free), shared by every format's exporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitseg_export.precisions import Thresholds, get_precision

OUTPUT_CHOICES = ("logits", "mask", "both")
CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("cpu", "trt")


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
    parity_data: str = "synthetic"  # the data spec whose validation images judge the export (self-parity)
    fp16_io: bool = False
    fold: bool = True  # exact rewrites (the family's fold); parity is still judged against the unfolded model
    # modules (paths under the network: `encoder.block.2.0`) a reduced precision keeps in float (`--keep-float`)
    keep_float: tuple[str, ...] = ()

    @property
    def output_names(self) -> list[str]:
        """The graph's output names, in order."""
        return ["logits", "mask"] if self.outputs == "both" else [self.outputs]


@dataclass
class Int8Settings:
    calib: str = "synthetic"
    calib_images: int = 32
    method: str = "minmax"
    target: str = "cpu"  # cpu: ONNX Runtime's integer kernels; trt: TensorRT's explicit quantization
    min_agreement: float | None = None  # None: the int8 preset's
    min_miou_vs_reference: float | None = None  # None: the int8 preset's
    heldout: str | None = None  # None: the validation split of `calib` (disjoint from its calibration split)
    heldout_images: int = 32
    max_fallback: int = 64
    # the CPU class the int8 arithmetic is made for (vitseg_export.machine.cpu): avx2 (the default) is saturation-safe,
    # 7-bit weights that compute the same integers on every x86 CPU; vnni (and amx) use all 8 bits, exact only
    # on CPUs with VNNI or AMX. Not used by --target trt.
    cpu_class: str = "avx2"
    allow_float_fallback: bool = False  # accept an int8 that is mostly float, or slower than fp32 here

    def targets(self) -> Thresholds:
        """The agreement and mIoU against the fp32 graph the int8 graph must reach: as set, else the int8
        preset's (the one place they are read from)."""
        preset = get_precision("int8").thresholds
        return Thresholds(preset.min_agreement if self.min_agreement is None else self.min_agreement,
                          preset.min_miou_vs_reference if self.min_miou_vs_reference is None else self.min_miou_vs_reference,
                          None, None)


@dataclass
class EngineSettings:
    workspace_gb: float = 4.0
    min_shape: tuple[int, ...] | None = None  # (N, 3, H, W); default from the artifact
    opt_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None
    sparsity: bool = False
    timing_cache: Path | None = None
    version_compatible: bool = False
    dla_core: int | None = None
    weakly_typed: bool = False
    # ahead-of-time editions (TensorRT-RTX): the compute capabilities ("8.6", ...) to build for; () for its default
    compute_capabilities: tuple[str, ...] = ()


@dataclass
class TritonSettings:
    """A Triton model repository (`--format triton`): the model's name, the Triton backend that runs it
    (None: the artifact format's native one), batching and instances."""

    name: str | None = None  # default: <architecture>-<precision>
    backend: str | None = None  # onnxruntime, openvino, tensorrt or python
    max_batch_size: int = 8
    instances: int = 1
    preferred_batch: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 0  # Triton's default: a lone request never waits; under load requests still batch
    device: str = "cpu"  # cpu or gpu: the instance group's kind


@dataclass
class QatSettings:
    """`vitseg qat`: quantization-aware fine-tuning from the PTQ starting point (the quantizer placement and
    ranges of `Int8Settings`), distilled from the fp32 model on the training split of `data`."""

    data: str = "synthetic"  # images to fine-tune on (their train split); labels are not needed
    epochs: int = 1
    # Adam's first steps move every parameter by about lr whatever its gradient: trained B0 at 512 px, 8 steps,
    # lr 1e-5 raised the distillation loss to 5.3e-4 and lowered held-out agreement from 99.79% (PTQ) to 99.36%;
    # lr 1e-6 ended at 2e-5 and 99.80% (the guides' 1e-5 assumes longer schedules)
    lr: float = 1e-6
    batch_size: int = 8
    seed: int = 0
    num_workers: int = 1


@dataclass
class ExportRequest:
    """Everything `vitseg export` can ask of a format's exporter; each exporter reads what it needs."""

    format: str = "onnx"
    onnx: OnnxExportSettings = field(default_factory=OnnxExportSettings)
    int8: Int8Settings = field(default_factory=Int8Settings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    check_trt: bool = False
    triton: TritonSettings = field(default_factory=TritonSettings)

    @property
    def precision(self) -> str:
        """The requested precision."""
        return self.onnx.precision
