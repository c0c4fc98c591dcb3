"""ONNX Runtime: CPU provider; CUDA and TensorRT providers when the installed onnxruntime has them."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np

from vitseg_export.artifact import ArtifactInfo, check_manifest_matches, read_onnx_info
from vitseg_export.errors import BackendMissingError, VitsegError
from vitseg_export.machine.probes import module_version
from vitseg_export.runners.base import INPUT_NAME, Runner, require_module
from vitseg_export.runners.bf16_emulation import emulated, has_bf16, load_graph
from vitseg_export.runners.torch_runner import torch_devices
from vitseg_export.tables import lazy_module

ort = lazy_module("onnxruntime")  # imported by the first session, as every backend's library


def session_options(threads: int | None = None, optimize: bool = True, emulate_int8: bool = False, spin: bool = True):
    """ONNX Runtime session options as vitseg uses them: quiet, optional thread count and optimization.
    `emulate_int8`: Q/DQ pairs are not fused into integer kernels, so DequantizeLinear feeds float MatMul/Conv
    (the int8 graph's exact meaning, on any CPU; checked under an emulated AVX2-only CPU in the tests).
    `spin`: worker threads spin after a run (the default); off for sessions that take turns (Runner.taking_turns)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if emulate_int8:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX artifact file, or an in-memory graph (`model_bytes` with its `info`), in ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, path: Path | str, device: str = "cpu", outputs: tuple[str, ...] | None = None,
                 provider: str | None = None, threads: int | None = None, model_bytes: bytes | None = None,
                 info: ArtifactInfo | None = None, optimize: bool = True):
        """`outputs` is accepted for the uniform interface: the graph decides what it returns."""
        path = Path(path)
        super().__init__(f"onnxruntime:{path.name}", device)
        self.path = path
        self.provider = provider
        self.threads = threads
        self.model_bytes = model_bytes
        self.optimize = optimize
        if model_bytes is not None and info is None:
            raise ValueError("an in-memory graph needs its ArtifactInfo")
        self.given_info = info
        self.bf16_emulated = False  # a bf16 graph run on the CPU provider, emulated (`_session`)

    def _precision(self) -> str | None:
        """The artifact's precision from its metadata (no session needed), None where it has none."""
        if self.given_info is not None:
            return self.given_info.precision
        try:
            return read_onnx_info(self.path).precision
        except VitsegError:
            return None

    def activate_impl(self) -> None:
        require_module("onnxruntime", "onnxruntime is not installed", "pip install onnxruntime (GPU: onnxruntime-gpu)")
        available = ort.get_available_providers()
        wanted = self.provider or ("CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider")
        if wanted not in available:
            raise BackendMissingError(f"this onnxruntime has no {wanted} (it has {', '.join(available)})",
                                      "pip install onnxruntime-gpu, or use --device cpu")
        # fp32 means fp32: ONNX Runtime's CUDA provider (like cuDNN under PyTorch) rounds matmul/conv inputs
        # to TF32 by default on Ampere and later, which put an H100's fp32 logits 1e-2 from PyTorch's
        first = (wanted, {"use_tf32": "0"}) if wanted == "CUDAExecutionProvider" else wanted
        providers = [first] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
        if self.model_bytes is None:
            check_manifest_matches(self.path)
        self.session = self._session(providers, emulate_int8=False)
        self.describe(self.given_info or ArtifactInfo.from_metadata(
            self.path, "onnx", dict(self.session.get_modelmeta().custom_metadata_map)), warn=self.model_bytes is None)
        if self.int8_emulated:  # known only from the metadata, which the first session read
            self.session = self._session(providers, emulate_int8=True)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        check_graph_matches(self.path, self.info, self.session.get_inputs()[0].shape,
                            {o.name: o.shape for o in self.session.get_outputs()})

    def _session(self, providers: list, emulate_int8: bool):
        source: bytes | str = self.model_bytes if self.model_bytes is not None else str(self.path)
        if providers == ["CPUExecutionProvider"] and self._precision() == "bf16":
            # ONNX Runtime's CPU provider has no bf16 kernels: the graph runs emulated, fp32 arithmetic with every
            # bf16 result rounded to bf16 (runners/bf16_emulation.py); said once, where a file is run
            model = load_graph(source)
            if has_bf16(model):
                source = emulated(model).SerializeToString()
                self.bf16_emulated = True
                if self.model_bytes is None:
                    warnings.warn(f"{self.path.name} is a bf16 graph; ONNX Runtime's CPU provider has no bf16 kernels, so "
                                  "vitseg runs it emulated (fp32 arithmetic, every bf16 result rounded to bf16): what "
                                  "a bf16 GPU engine stores, not its speed", stacklevel=2)
        try:
            options = session_options(self.threads, self.optimize, emulate_int8, spin=not self.turns)
            return ort.InferenceSession(source, options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf types
            raise VitsegError(f"{self.path} is not a loadable ONNX model ({str(e).splitlines()[0][:200]})",
                              "the file is damaged or truncated; export it again") from None

    def infer_impl(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(None, {INPUT_NAME: pixels.astype(self.input_dtype, copy=False)})
        except Exception as e:  # ONNX Runtime's own error types (InvalidArgument, Fail, RuntimeException)
            raise VitsegError(f"ONNX Runtime could not run {self.path.name} on a {tuple(pixels.shape)} input "
                              f"({str(e).strip().splitlines()[0][:200]})", "re-export the artifact") from None
        return dict(zip(self.output_names, results))

    def deactivate_impl(self) -> None:
        del self.session


def check_graph_matches(path: Path, info: ArtifactInfo, input_shape: list, outputs: dict[str, list]) -> None:
    """VitsegError when an artifact's metadata disagrees with its graph (a damaged or hand-edited artifact):
    the input's static size and batch, the output names, the class count of static logits."""
    def static(dim) -> bool:
        return isinstance(dim, int) and dim > 0

    where = f"{path.name}: its metadata says"
    hint = "the metadata was changed after export; re-export it with `vitseg export`"
    if len(input_shape) == 4:
        n, _, h, w = input_shape
        if static(h) and static(w) and (info.dynamic_size or (h, w) != tuple(info.image_size)):
            size = "a dynamic size" if info.dynamic_size else f"{info.image_size[0]}x{info.image_size[1]}"
            raise VitsegError(f"{where} {size}, and its graph takes {h}x{w}", hint)
        if static(n) and info.dynamic_batch:
            raise VitsegError(f"{where} a dynamic batch, and its graph takes batch {n}", hint)
    if set(info.outputs) != set(outputs):
        raise VitsegError(f"{where} outputs {', '.join(info.outputs)}, and its graph has {', '.join(outputs)}", hint)
    logits = outputs.get("logits")
    if info.class_names and logits is not None and len(logits) == 4 and static(logits[1]) and logits[1] != len(info.class_names):
        raise VitsegError(f"{where} {len(info.class_names)} classes, and its graph predicts {logits[1]}", hint)


def graph_runner(model, size: tuple[int, int], num_classes: int, precision: str, cpu_class: str = "") -> OnnxRuntimeRunner:
    """A CPU runner for an in-memory graph of vitseg's layout (`pixels` in, `logits` first out) that carries
    no vitseg metadata yet (intermediate graphs of the precision steps): its batch and size as the graph has
    them, `num_classes` (0: as the graph has them), the CPU class an int8 graph is made for ("": none, 8-bit)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    symbolic = [not d.HasField("dim_value") for d in dims]
    logits = model.graph.output[0].type.tensor_type.shape.dim
    num_classes = num_classes or (logits[1].dim_value if len(logits) == 4 and logits[1].HasField("dim_value") else 0)
    info = ArtifactInfo(Path("graph.onnx"), "onnx", "in-memory graph", [f"class_{i}" for i in range(num_classes)],
                        size, (0.0,) * 3, (1.0,) * 3, precision, None, [o.name for o in model.graph.output],
                        dynamic_batch=bool(symbolic and symbolic[0]), dynamic_size=len(symbolic) == 4 and symbolic[2],
                        source_sha256=None, vitseg_version="", cpu_class=cpu_class)
    return OnnxRuntimeRunner(f"{precision}-graph.onnx", "cpu", model_bytes=model.SerializeToString(), info=info)


def onnxruntime_devices() -> list[str]:
    """The devices the onnxruntime backend can use here: the CPU, and CUDA where its provider and a GPU are."""
    if module_version("onnxruntime")[0] is None:
        return []
    providers = importlib.import_module("onnxruntime").get_available_providers()
    return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in providers and "cuda" in torch_devices() else [])
