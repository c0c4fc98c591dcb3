"""OpenVINO behind the runner interface: an IR (`.xml` + `.bin`) or an ONNX artifact, on CPU, GPU (Intel
iGPU/dGPU), NPU or AUTO. Needs only numpy and openvino: no torch, no onnxruntime."""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from vitseg_export.artifact import (
    ArtifactInfo,
    check_artifact_file,
    check_manifest_matches,
    manifest_path,
    read_manifest,
    read_onnx_metadata,
)
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.files import check_readable_file, sha256_file
from vitseg_export.machine.probes import module_version
from vitseg_export.runners.base import INPUT_NAME, Runner, require_module

OPENVINO_HINT = "pip install 'vitseg-export[openvino]'"


_CORE: list[Any] = []


def openvino_core() -> Any:
    """The process's one openvino.Core (BackendMissingError, one line, when openvino is not installed).

    One, kept for the life of the process: a Core going away unloads the frontend and plugin libraries
    while models it read or compiled may still be alive, and their later destruction then crashes the
    interpreter (seen as a segfault in the test suite with a Core per call)."""
    if not _CORE:
        _CORE.append(require_module("openvino", "OpenVINO is not installed", OPENVINO_HINT).Core())
    return _CORE[0]


# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA; DNNL_MAX_CPU_ISA is its old name) narrows OpenVINO's CPU kernels, yet the
# plugin still reports BF16 and FP16 and then cannot compile a bf16 Softmax ("Supported primitive descriptors list is
# empty", OpenVINO 2026.4 under ONEDNN_MAX_CPU_ISA=AVX2, measured): under a cap below the ISA that computes a
# precision, the CPU counts as not having it. The caps that keep it are the rest (AVX512_CORE_BF16 and up for bf16,
# AVX512_CORE_FP16 / AVX10_1_512 and up for f16, ALL, DEFAULT).
_BELOW_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
ISA_CAPS_WITHOUT = {"bf16": _BELOW_BF16, "f16": _BELOW_BF16 | {"AVX512_CORE_BF16"}}


def isa_cap() -> str:
    """oneDNN's CPU ISA cap from the environment, upper case ("" when none is set)."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def capped_below(device: str, wanted: str) -> bool:
    """Whether oneDNN's ISA cap keeps this CPU from computing in `wanted`."""
    return device.upper() == "CPU" and isa_cap() in ISA_CAPS_WITHOUT.get(wanted, ())


def lacks_why(device: str, wanted: str) -> str:
    """Why a device computes in f32 instead of `wanted`: for the words of a warning."""
    return f"ONEDNN_MAX_CPU_ISA={isa_cap()} caps this {device} below it" if capped_below(device, wanted) else f"this {device} has none"


def inference_precision(core: Any, device: str, wanted: str) -> str:
    """The INFERENCE_PRECISION_HINT to compile with: `wanted` ("f32", "f16", "bf16") where the device computes
    in it, else "f32". Always explicit, so a CPU with bf16 (AVX512-BF16, AMX) never silently runs an fp32 IR
    in bf16."""
    if wanted == "f32" or device == "AUTO" or capped_below(device, wanted):
        return "f32"
    capabilities = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    return wanted if {"f16": "FP16", "bf16": "BF16"}.get(wanted) in capabilities else "f32"


def compile_config(core: Any, device: str, wanted: str, threads: int | None = None, emulate_int8: bool = False) -> dict:
    """compile_model's config as vitseg's runner uses it: latency hint, the inference precision (`wanted` where
    the device has it), threads on the CPU. `emulate_int8`: the CPU plugin's low-precision transformations (which
    turn FakeQuantize + MatMul/Convolution into integer kernels) are off, so FakeQuantize runs in float: the IR's
    exact int8 meaning on any CPU (LP_TRANSFORMS_MODE, a property of the CPU plugin; checked under an emulated
    AVX2-only CPU in the tests)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision(core, device, wanted)}
    if threads and device == "CPU":
        config["INFERENCE_NUM_THREADS"] = str(threads)
    if emulate_int8 and device == "CPU":
        config["LP_TRANSFORMS_MODE"] = "NO"
    return config


class OpenVINORunner(Runner):
    """Compiles an IR or ONNX file (or an in-memory `ov.Model` with its `info`) for one OpenVINO device."""

    backend = "openvino"
    devices = ("cpu", "gpu", "npu", "auto")

    def __init__(self, path: Path | str, device: str = "cpu", outputs: tuple[str, ...] | None = None,
                 threads: int | None = None, model: Any = None, info: ArtifactInfo | None = None, announce: bool = True):
        """`outputs` is accepted for the uniform interface (the model decides); `threads` applies to CPU. `announce`:
        warn when the device lacks the precision the IR computes in (an export says it in its progress instead)."""
        path = Path(path)
        super().__init__(f"openvino:{path.name}", device)
        self.path, self.threads, self.model, self.given_info, self.announce = path, threads, model, info, announce
        if model is not None and info is None:
            raise ValueError("an in-memory model needs its ArtifactInfo")

    def activate_impl(self) -> None:
        core = openvino_core()
        device = self.device.upper()
        if device != "AUTO" and device not in core.available_devices:
            raise BackendMissingError(f"OpenVINO sees no {device} device here (it has {', '.join(core.available_devices)})",
                                      "use --device cpu, or install the device's OpenVINO driver")
        self.describe(self.given_info or read_openvino_info(self.path), warn=self.model is None)
        model = self.model if self.model is not None else read_ir(core, self.path)
        wanted = self.info.extra.get("inference_precision", '"f32"').strip('"')
        config = compile_config(core, device, wanted, self.threads, self.int8_emulated)
        try:
            self.compiled = core.compile_model(model, device, config)
        except RuntimeError as e:
            raise VitsegError(f"OpenVINO could not compile {self.path.name} for {device} ({openvino_reason(e)})",
                              "re-export the artifact, or try --device cpu") from None
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.compiled_precision = config["INFERENCE_PRECISION_HINT"]
        if self.compiled_precision != wanted and self.announce and self.model is None and device != "AUTO":
            # OpenVINO itself would compute in f32 without a word: what is judged or timed here is f32
            warnings.warn(f"{self.path.name} computes in {wanted} where the device has {wanted} arithmetic; {lacks_why(device, wanted)}, "
                          f"so it runs in {self.compiled_precision} here (a verdict here judges "
                          f"{self.compiled_precision}; verify on a device with {wanted} to judge that)", stacklevel=2)

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({INPUT_NAME: pixels})
        # the request reuses its output buffers: copy before the next inference overwrites them
        return {name: np.array(results[out]) for name, out in zip(self.output_names, self.compiled.outputs)}

    def deactivate_impl(self) -> None:
        del self.request, self.compiled


def read_ir(core: Any, path: Path) -> Any:
    """The ov.Model of an IR (or ONNX file), its weights checked first: an `.xml` needs its `.bin` beside it,
    and where the manifest records the .bin's sha256 the .bin must be that one (another model's weights of the
    same size would run and give wrong masks). VitsegError (one line) for a missing, mismatched or damaged IR."""
    if path.suffix.lower() == ".xml":
        weights = path.with_suffix(".bin")
        if not weights.exists():
            raise VitsegError(f"{path.name} has no {weights.name} beside it (the IR's weights)",
                              "keep the .xml and its .bin together, or export it again")
        check_readable_file(weights, "IR weights")
        check_manifest_matches(path)
        # the IR records its .bin's sha256 in its own rt_info (an IR without its manifest is still checked)
        recorded = read_openvino_info(path).extra.get("bin_sha256") or _recorded_bin_sha256(path)
        if recorded and sha256_file(weights) != recorded:
            raise VitsegError(f"{weights.name} is not the weights {path.name} was exported with (its sha256 is not the "
                              "one the IR records)", "copy the .bin that belongs to this .xml, or export it again")
    try:
        return core.read_model(str(path))
    except RuntimeError as e:
        raise VitsegError(f"{path.name} is not a readable OpenVINO model ({openvino_reason(e)})",
                          "the .xml or its .bin is damaged or truncated; export it again") from None


def openvino_reason(e: Exception) -> str:
    """The line of an OpenVINO exception that says what went wrong (it starts with 'Exception from FILE:LINE'
    and "Check '...' failed at" lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (said or lines or [type(e).__name__])[0][:200]


def _recorded_bin_sha256(path: Path) -> str | None:
    """The .bin's sha256 that the IR's manifest records, if there is a readable manifest."""
    if not manifest_path(path).is_file():
        return None
    return read_manifest(path).extra.get("bin_sha256")


def read_openvino_info(path: Path) -> ArtifactInfo:
    """vitseg metadata of an OpenVINO IR (its rt_info, parsed from the .xml: no openvino needed) or of an
    ONNX artifact run by OpenVINO."""
    if path.suffix.lower() == ".onnx":
        return ArtifactInfo.from_metadata(path, "onnx", read_onnx_metadata(path))
    check_artifact_file(path)
    props: dict[str, str] = {}
    try:
        for _, element in ET.iterparse(path, events=("end",)):
            if element.tag == "vitseg":
                props = {f"vitseg.{child.tag}": child.attrib.get("value", "") for child in element}
                break
    except (ET.ParseError, OSError) as e:
        raise VitsegError(f"{path} is not a readable OpenVINO IR ({e})", "the file is damaged; export it again") from None
    return ArtifactInfo.from_metadata(path, "openvino", props)


def openvino_devices() -> list[str]:
    """The devices the openvino backend can use here (lower case), and "auto"."""
    if module_version("openvino")[0] is None:
        return []
    return [d.split(".")[0].lower() for d in openvino_core().available_devices] + ["auto"]
