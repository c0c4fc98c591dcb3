"""What an export is asked to do: plain dataclasses (torch-free), shared by every format's exporter, and the one
function that builds that request from options (`export_request`: `vitseg export`, `vitseg qat` and the benchmark)
after checking each given option applies (`check_options_apply`: which options apply to what is a column of the
format, precision, int8 target and Triton backend rows). Each default is stated once, here, as a field default."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from vitseg_export.artifact import DEFAULT_MAX_BATCH
from vitseg_export.errors import VitsegError
from vitseg_export.formats import FORMATS, Format
from vitseg_export.precisions import PRECISIONS, Precision, Thresholds, get_precision
from vitseg_export.tables import Table

OUTPUT_CHOICES = ("logits", "mask", "both")
CALIB_METHODS = ("minmax", "entropy", "percentile")
TRITON_DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Int8Target:
    """What runs an int8 graph: its integer arithmetic, and the export options that apply to it alone."""

    name: str
    description: str
    options: tuple[str, ...] = ()


INT8_TARGETS: Table[Int8Target] = Table("--target {name} is unknown", "use one of: {names}")
INT8_TARGETS.register(Int8Target("cpu", "ONNX Runtime's integer kernels (x86 CPUs)", options=("cpu_class",)))
INT8_TARGETS.register(Int8Target("trt", "TensorRT's explicit quantization (float part in fp16)"))


@dataclass
class OnnxExportSettings:
    precision: str = "fp32"
    opset: int = 17
    image_size: tuple[int, int] | None = None  # None: the checkpoint's
    dynamic_batch: bool = True
    dynamic_size: bool = False
    outputs: str = "logits"
    simplify: bool = False
    # the verdict's images: the first `verdict_images` (None: the precision row's count) of the validation split of
    # `parity_data` (int8: of Int8Settings.heldout), one set for the fp32 graph's check, the int8 decision and the
    # final verdict
    verdict_images: int | None = None
    parity_data: str = "synthetic"  # the data spec whose validation images judge the export (self-parity)
    # the largest batch a dynamic-batch artifact is judged at and declares it serves (`--max-batch`; recorded)
    max_batch: int = DEFAULT_MAX_BATCH
    judge_batches: tuple[int, ...] = ()  # also judged at these batches (a Triton repository's preferred batches)
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
    # the verdict's images (and so the fallback's decision) come from this spec's validation split (disjoint from
    # `calib`'s calibration split); None: `calib`'s
    heldout: str | None = None
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
    golden: bool = False  # also write NAME.golden beside the artifact (`--save-golden`), in its group

    @property
    def precision(self) -> str:
        """The requested precision."""
        return self.onnx.precision


# option (a `vitseg export` parameter name) -> (ExportRequest section, field). `no_fold` is `fold` inverted.
REQUEST_FIELDS: dict[str, tuple[str, str]] = {
    "precision": ("onnx", "precision"), "opset": ("onnx", "opset"), "image_size": ("onnx", "image_size"),
    "dynamic_batch": ("onnx", "dynamic_batch"), "dynamic_size": ("onnx", "dynamic_size"), "outputs": ("onnx", "outputs"),
    "simplify": ("onnx", "simplify"), "fp16_io": ("onnx", "fp16_io"), "no_fold": ("onnx", "fold"),
    "max_batch": ("onnx", "max_batch"), "num_images": ("onnx", "verdict_images"),
    "keep_float": ("onnx", "keep_float"), "data": ("onnx", "parity_data"),
    "calib": ("int8", "calib"), "calib_images": ("int8", "calib_images"), "calib_method": ("int8", "method"),
    "target": ("int8", "target"), "heldout": ("int8", "heldout"), "min_agreement": ("int8", "min_agreement"),
    "cpu_class": ("int8", "cpu_class"), "allow_float_fallback": ("int8", "allow_float_fallback"),
    "workspace": ("engine", "workspace_gb"), "min_shape": ("engine", "min_shape"), "opt_shape": ("engine", "opt_shape"),
    "max_shape": ("engine", "max_shape"), "sparse_weights": ("engine", "sparsity"),
    "timing_cache": ("engine", "timing_cache"), "version_compatible": ("engine", "version_compatible"),
    "dla_core": ("engine", "dla_core"), "weakly_typed": ("engine", "weakly_typed"),
    "compute_capability": ("engine", "compute_capabilities"),
    "triton_name": ("triton", "name"), "triton_backend": ("triton", "backend"),
    "triton_max_batch": ("triton", "max_batch_size"), "triton_instances": ("triton", "instances"),
    "triton_preferred_batch": ("triton", "preferred_batch"), "triton_queue_delay_us": ("triton", "max_queue_delay_us"),
    "triton_device": ("triton", "device"), "check_trt": ("", "check_trt"), "save_golden": ("", "golden"),
}
SECTIONS = {"onnx": OnnxExportSettings, "int8": Int8Settings, "engine": EngineSettings, "triton": TritonSettings}


def default_of(option: str) -> Any:
    """The default of an export option: its request field's default (the one place it is stated)."""
    section, name = REQUEST_FIELDS[option]
    value = next(f.default for f in fields(SECTIONS[section] if section else ExportRequest) if f.name == name)
    return not value if option == "no_fold" else value


def check_options_apply(given: Iterable[str], fmt: Format, precision: Precision, target: str,
                        also: Mapping[str, tuple[str, ...]] = {}, chosen: str | None = None) -> None:
    """An option given for a format, precision or int8 target it does not apply to is refused (VitsegError),
    never silently ignored. What an option applies to is a column of the rows: `Format.options`,
    `Precision.options`, `Int8Target.options`; `also` adds other owners ({"--format triton --triton-backend
    tensorrt": the Triton backend row's options}), of which `chosen` is the one this export is. Options no row
    lists apply to every export."""
    owners: dict[str, tuple[str, ...]] = {
        **{f"--format {f.name}": f.options for f in FORMATS.values()}, **also,
        **{f"--precision {p.name}": p.options for p in PRECISIONS.values()},
        **{f"--precision int8 --target {t.name}": t.options for t in INT8_TARGETS.values()}}
    applies = set(fmt.options) | set(precision.options) | set(also.get(chosen or "", ()))
    if precision.calibrated:
        applies |= set(INT8_TARGETS.row(target).options)
    for option in given:
        listed_by = [owner for owner, options in owners.items() if option in options]
        if not listed_by or option in applies:
            continue
        flag, what = "--" + option.replace("_", "-"), " or ".join(listed_by)
        against = f"--format {fmt.name} --precision {precision.name}" + (f" --target {target}" if precision.calibrated else "")
        raise VitsegError(f"{flag} applies to {what} only, not {against}", f"drop {flag}, or export with {what}")


def export_request(fmt: Format, options: Mapping[str, Any]) -> ExportRequest:
    """The request an export of `fmt` makes from option values (parameter names of `vitseg export`, typed and parsed;
    None or absent: the default). Derived defaults: the int8 target is the format's, the calibration data is
    --data, the batch is static for formats that run faster static."""
    values = {k: v for k, v in options.items() if v is not None and k in REQUEST_FIELDS}
    if "no_fold" in values:
        values["no_fold"] = not values["no_fold"]
    values.setdefault("dynamic_batch", not fmt.static_by_default)
    values.setdefault("target", fmt.int8_target)
    values.setdefault("calib", values.get("data", OnnxExportSettings.parity_data))
    sections: dict[str, dict[str, Any]] = {name: {} for name in (*SECTIONS, "")}
    for option, value in values.items():
        section, name = REQUEST_FIELDS[option]
        sections[section][name] = value
    get_precision(sections["onnx"].get("precision", OnnxExportSettings.precision))
    INT8_TARGETS.row(sections["int8"]["target"])
    return ExportRequest(fmt.name, **{name: cls(**sections[name]) for name, cls in SECTIONS.items()}, **sections[""])
