"""The CLI's vocabulary, declared once: every option name any command takes, with the one meaning (help text)
it has in all of them. A command declares an option with `opt(name, noun)`, where `noun` fills the `{noun}` of
the help text with what that command applies it to; tests/test_cli_vocabulary.py walks the app and fails when
an option is not in this table, when its help is not this table's, or when one name has two types.

Choices are Enums built from the tables (formats, precisions, backends, ...), so `--help` lists them and a wrong
one is the parser's one-line error. Old spellings (DEPRECATED) keep working for one release: `main()` rewrites
them before parsing and says so in one line on stderr."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import typer

from vitseg_export.formats import FORMATS
from vitseg_export.machine.cpu import CPU_CLASSES
from vitseg_export.precisions import PRECISIONS
from vitseg_export.runners import BACKENDS
from vitseg_export.serving.repository import TRITON_BACKENDS
from vitseg_export.settings import CALIB_METHODS, INT8_TARGETS, OUTPUT_CHOICES, TRITON_DEVICES

# help panels of the long commands
OUTPUT, DATA, GRAPH, PRECISION, INT8, TENSORRT, TRITON, SERVER, TRAINING = (
    "Output", "Data", "Graph", "Precision", "int8", "TensorRT", "Triton", "Served model", "Training")


_TABLE_CHOICES: list[tuple[type[enum.StrEnum], Any]] = []  # (Enum, the table whose names it lists)


def _choices(name: str, values) -> type[enum.Enum]:
    """An Enum of a table's names (str-valued: its members are the strings the library takes), kept in step with
    the table by `refresh_choices` (a format or backend registered after import is a choice too)."""
    choice = enum.StrEnum(name, {str(v): str(v) for v in values})  # type: ignore[misc]
    _TABLE_CHOICES.append((choice, values))
    return choice  # type: ignore[return-value]


def refresh_choices() -> None:
    """Make every table's Enum list the table's names as they are now. Formats and backends are registered by
    the module that brings them (formats.FORMATS.register / scoped), possibly after this module was imported;
    typer reads an Enum's members each time it builds the app (every `main()`), so the parser and `--help` then
    offer exactly the registered names. Enum has no public way to change its members: the three maps it keeps
    (`_member_names_`, `_member_map_`, `_value2member_map_`) are rebuilt here, members of unchanged names kept."""
    for choice, table in _TABLE_CHOICES:
        names = [str(v) for v in table]
        if names == list(choice._member_names_):
            continue
        members = {}
        for name in names:
            member = choice._member_map_.get(name)
            if member is None:
                member = str.__new__(choice, name)
                member._name_, member._value_ = name, name
            members[name] = member
        choice._member_names_[:] = names
        choice._member_map_.clear()
        choice._member_map_.update(members)
        choice._value2member_map_.clear()
        choice._value2member_map_.update(members)


FormatChoice = _choices("FormatChoice", FORMATS)
PrecisionChoice = _choices("PrecisionChoice", PRECISIONS)
BackendChoice = _choices("BackendChoice", BACKENDS)
OutputsChoice = _choices("OutputsChoice", OUTPUT_CHOICES)
CalibMethodChoice = _choices("CalibMethodChoice", CALIB_METHODS)
TargetChoice = _choices("TargetChoice", INT8_TARGETS)
CpuClassChoice = _choices("CpuClassChoice", CPU_CLASSES)
TritonBackendChoice = _choices("TritonBackendChoice", TRITON_BACKENDS)
TritonDeviceChoice = _choices("TritonDeviceChoice", TRITON_DEVICES)


@dataclass(frozen=True)
class Term:
    flags: tuple[str, ...]
    help: str  # "{noun}": what the command applies it to
    panel: str | None = None
    names: str = ""  # what its value names (a checkpoint, a data spec, a path): an empty or blank value is refused
    path: bool = False  # its value is a Path (with `names`: the parser returns one)


def never_blank(names: str, path: bool = False) -> Callable[[Any], Any]:
    """The parser of every argument and option whose value names a checkpoint, an artifact, an image, a data spec or
    a path: "" and whitespace are refused (the parser's one-line usage error, exit 2) before any work. Needed as a
    parser, not a callback: typer turns "" into Path("") == Path("."), the working directory, before a callback sees
    it, so `vitseg export ""` would export whatever the working directory holds."""
    def parse(value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise typer.BadParameter(f"an empty value ({value!r}) is not {names}")
        return Path(value) if path else value
    return parse


def arg(help: str, names: str, *, path: bool = False, **kwargs: Any) -> Any:
    """A command argument naming `names` (a checkpoint, an artifact, sources): never blank (`never_blank`)."""
    return typer.Argument(help=help, parser=never_blank(names, path), **kwargs)


DATA_SPECS = "synthetic[:N], pets:DIR or folder:DIR"
CHECKPOINT_HELP = "A run directory, .safetensors file, Hugging Face directory, Hub id (org/name) or architecture name."
_TERMS = [
    # results
    Term(("--version",), "Print vitseg's version and exit."),
    Term(("--verbose",), "Show third-party libraries' logs, prints and warnings (quantizers, converters) on stderr."),
    Term(("--json",), "Print the result as JSON on stdout (machine-readable; progress stays on stderr).", OUTPUT),
    Term(("--report",), "Also write the result as JSON to this file{noun}.", OUTPUT, "a file", True),
    Term(("--output", "-o"), "Where to write {noun}.", OUTPUT, "a path", True),
    # models and where they run
    Term(("--model",), "Architecture{noun} (see `vitseg models`).", names="an architecture"),
    Term(("--reference", "-r"), "The checkpoint the artifact was exported from: run dir, .safetensors, Hugging Face "
                                "directory or Hub id{noun}.", names="a checkpoint"),
    Term(("--revision",), "Hub ids: the branch, tag or commit to load (default: main), from the local Hugging Face "
                          "cache first.", names="a branch, tag or commit"),
    Term(("--device",), "Device to run on{noun}: cpu or cuda; OpenVINO artifacts also gpu, npu or auto."),
    Term(("--backend",), "The runner backend{noun} (default: the artifact format's)."),
    Term(("--threads",), "Intra-op threads (default: the runtime's)."),
    # formats and precisions
    Term(("--format",), "Artifact format{noun}.", PRECISION),
    Term(("--formats",), "Artifact formats{noun}, comma-separated; auto: every format this machine can make.", PRECISION),
    Term(("--precision",), "Numeric precision{noun}.", PRECISION),
    Term(("--precisions",), "Numeric precisions{noun}, comma-separated.", PRECISION),
    Term(("--image-size",), "Input size, S or HxW{noun} (default: the checkpoint's)."),
    # data and image counts
    Term(("--data",), "Data spec{noun}: " + DATA_SPECS + ".", DATA, "a data spec"),
    Term(("--num-images",), "How many validation images{noun}.", DATA),
    Term(("--batch-sizes",), "Batch sizes{noun}, comma-separated."),
    Term(("--batch-size",), "Images per {noun}."),
    # export graph
    Term(("--opset",), "ONNX opset (17: native LayerNormalization, TensorRT-portable).", GRAPH),
    Term(("--dynamic-batch/--static-batch",), "Dynamic batch dimension (default: dynamic; static for formats that run "
                                              "faster static: openvino){noun}.", GRAPH),
    Term(("--max-batch",), "The largest batch a dynamic-batch artifact declares it serves: it is judged at 1, a "
                           "middle batch and this one before it is written, and recorded (Triton: --triton-max-batch).",
         GRAPH),
    Term(("--dynamic-size",), "Dynamic height and width (SegFormer only).", GRAPH),
    Term(("--outputs",), "What the graph outputs: logits, mask (in-graph argmax, uint8) or both.", GRAPH),
    Term(("--simplify",), "Simplify with onnxslim (verified not to change outputs).", GRAPH),
    Term(("--no-fold",), "Skip the exact graph rewrites (decoder and BatchNorm folding){noun}.", GRAPH),
    Term(("--fp16-io",), "fp16: float16 graph input and output (default float32).", PRECISION),
    Term(("--keep-float",), "fp16, int8: modules to keep in float, comma-separated module paths (e.g. encoder.block.2.0, "
                            "as `vitseg verify --locate` names them; an unknown name is refused naming the nearest).",
         PRECISION),
    Term(("--check-trt",), "Check the ONNX for TensorRT: lint it against the parser's supported ops, then parse and build "
                           "it with TensorRT-RTX (ahead of time, no GPU needed) where it is installed.", TENSORRT),
    # int8
    Term(("--calib",), "int8: calibration data spec (its calib split){noun}; default: --data.", INT8, "a data spec"),
    Term(("--calib-images",), "int8: how many calibration images.", INT8),
    Term(("--calib-method",), "int8: how calibration sets activation ranges.", INT8),
    Term(("--heldout",), "int8: data spec whose validation split judges the result and decides the float fallback; "
                         "default: --calib's.", INT8, "a data spec"),
    Term(("--target",), "int8: what runs it: cpu (ONNX Runtime's integer kernels) or trt (TensorRT: float part in fp16); "
                        "default trt for TensorRT formats, else cpu.", INT8),
    Term(("--cpu-class",), "int8 for CPUs: the class of CPU it will run on: avx2 (default: 7-bit weights, exact on every "
                           "x86 CPU), vnni or amx (8-bit weights: exact only with VNNI or AMX). `vitseg doctor` names "
                           "this machine's.", INT8),
    Term(("--allow-float-fallback",), "int8: accept{noun} an int8 artifact that is mostly float after the fallback, or "
                                      "slower than fp32 on the CPU class it is for (default: refused).", INT8),
    Term(("--min-agreement",), "Lowest pixel agreement with the reference accepted{noun} (0..1; default: the "
                               "precision's preset)."),
    Term(("--min-miou",), "Lowest mIoU against the reference accepted (0..1; default: the precision's preset)."),
    Term(("--max-abs-diff",), "Largest |logit difference| accepted (>= 0; default: the precision's preset)."),
    # TensorRT
    Term(("--workspace",), "TensorRT: builder workspace in GB.", TENSORRT),
    Term(("--min-shape",), "TensorRT: the smallest input NxCxHxW of the optimization profile.", TENSORRT),
    Term(("--opt-shape",), "TensorRT: the input NxCxHxW the profile is tuned for.", TENSORRT),
    Term(("--max-shape",), "TensorRT: the largest input NxCxHxW of the optimization profile.", TENSORRT),
    Term(("--sparse-weights",), "TensorRT: allow 2:4 sparse kernels (Ampere and later).", TENSORRT),
    Term(("--timing-cache",), "TensorRT: timing cache file to reuse and update.", TENSORRT, "a file", True),
    Term(("--version-compatible",), "TensorRT: an engine later TensorRT versions can run.", TENSORRT),
    Term(("--dla-core",), "TensorRT: build for this DLA core (Jetson; fp16 or int8, static shapes).", TENSORRT),
    Term(("--weakly-typed",), "TensorRT 10.x: build with FP16/INT8 builder flags instead of a strongly typed network.",
         TENSORRT),
    Term(("--compute-capability",), "TensorRT-RTX: the GPU compute capabilities to build for, comma-separated{noun}.",
         TENSORRT),
    # Triton
    Term(("--triton-name",), "Triton: the model's name (default: ARCHITECTURE-PRECISION).", TRITON),
    Term(("--triton-backend",), "Triton: the backend that runs the model (default: the artifact format's native one; "
                                "python: vitseg's runner).", TRITON),
    Term(("--triton-device",), "Triton: the kind of model instances.", TRITON),
    Term(("--triton-instances",), "Triton: model instances.", TRITON),
    Term(("--triton-max-batch",), "Triton: the largest batch the dynamic batcher forms.", TRITON),
    Term(("--triton-preferred-batch",), "Triton: batch sizes the batcher prefers, comma-separated.", TRITON),
    Term(("--triton-queue-delay-us",), "Triton: how long a request may wait for others to batch with, in "
                                       "microseconds (0: never).", TRITON),
    # served models
    Term(("--server",), "{noun} a served model instead: http://HOST:PORT or grpc://HOST:PORT.", SERVER),
    Term(("--served-model",), "--server: the served model's name.", SERVER),
    Term(("--concurrency",), "--server: concurrent requests, comma-separated levels{noun}.", SERVER),
    Term(("--duration",), "Seconds {noun} runs."),
    # verify
    Term(("--sizes",), "Other HxW sizes to judge a dynamic-size artifact at, comma-separated (default: one, 3/4 of "
                       "its own)."),
    Term(("--save-diff",), "Write input, reference, artifact and disagreement PNGs to this directory.", OUTPUT,
         "a directory", True),
    Term(("--golden",), "Judge against a golden file (its images and the PyTorch reference's outputs on them, at every "
                        "shape it holds) instead of the checkpoint: no PyTorch needed.", None, "a golden file", True),
    Term(("--save-golden",), "Also write ARTIFACT.golden beside the artifact: the verdict's images (8-bit) and the "
                             "PyTorch reference's outputs on them at every judged shape, for `vitseg verify --golden` "
                             "where the artifact runs (no PyTorch there).", OUTPUT),
    Term(("--locate",), "Also find where the artifact first leaves PyTorch: its tensors against the reference's at the "
                        "model's named boundaries on 4 images, the first past the precision's allowance, and the export "
                        "command that keeps it in float."),
    # profile
    Term(("--warmup",), "Untimed runs before timing."),
    Term(("--iters",), "Timed runs{noun}."),
    Term(("--autocast",), "Run checkpoints under PyTorch's CUDA fp16 autocast (eager fp16); artifacts keep their "
                          "exported precision."),
    # training
    Term(("--epochs",), "Passes over the training images{noun}.", TRAINING),
    Term(("--lr",), "Learning rate{noun}.", TRAINING),
    Term(("--workers",), "Data-loading worker processes (0: in the main process).", TRAINING),
    Term(("--seed",), "Random seed.", TRAINING),
    Term(("--init",), "Start from a vitseg run, a Hugging Face SegFormer directory or Hub id, or timm / seed-article "
                      "ViT weights (.npz, .pth, .safetensors).", TRAINING, "a checkpoint"),
    Term(("--train-images",), "How many synthetic training images.", TRAINING),
    # predict
    Term(("--overlay",), "Also write colour overlays."),
    Term(("--allow-large-images",), "Read images over 64 MP (default: refused)."),
    Term(("--masks",), "Videos: write the class-index mask as a lossless video (<stem>_mask.mkv, FFV1: pixel value = "
                       "class index) instead of the colour overlay (<stem>_overlay.mp4); with --overlay, both."),
    Term(("--every",), "Video files and folders: run every Nth frame (1: all)."),
    Term(("--max-frames",), "Stop each video source after this many frames run (default: a file's end; a live source "
                            "runs until --duration or Ctrl-C)."),
    Term(("--timeout",), "Cameras and streams: seconds to wait for the source to open and for each next frame; a "
                         "source silent for longer ends the run."),
    # prune
    Term(("--ratio",), "Share of heads or channels to remove, in (0, 1)."),
    Term(("--method",), "What to prune: heads, mlp, channels (SegFormer decoder) or all."),
    Term(("--sparsity",), "2:4 magnitude sparsity for TensorRT's sparse kernels."),
    Term(("--finetune-epochs",), "Fine-tuning epochs after pruning (0: none).", TRAINING),
    Term(("--prune",), "Also benchmark pruned copies at these ratios, comma-separated (e.g. 0.25,0.5; method all, no "
                       "fine-tuning: use `vitseg prune` for that)."),
    # models, doctor, serve
    Term(("--include-test",), "Also list the tiny test twins."),
    Term(("--prepare",), "Also build what third-party libraries compile on first use (NNCF's PyTorch extension), so "
                         "a first `vitseg qat --format openvino` does not pay for it."),
    Term(("--http-port",), "KServe v2 over HTTP: the port."),
    Term(("--grpc-port",), "KServe v2 over gRPC: the port."),
    Term(("--metrics-port",), "Prometheus metrics: the port."),
    Term(("--tritonserver",), "The tritonserver binary (default: the one the serve extra installs, else PATH).",
         names="a file", path=True),
]
VOCABULARY: dict[str, Term] = {t.flags[0].split("/")[0]: t for t in _TERMS}


def opt(flag: str, noun: str = "", *, panel: str | None = None, **kwargs: Any) -> Any:
    """The option `flag` (a VOCABULARY key) with its one help text, `noun` filling `{noun}`; never blank where its
    term `names` something (`never_blank`)."""
    term = VOCABULARY[flag]
    if term.names:
        kwargs.setdefault("parser", never_blank(term.names, term.path))
    return typer.Option(*term.flags, help=term.help.format(noun=noun), rich_help_panel=panel or term.panel, **kwargs)


# Old spelling -> new, per command: rewritten by `main()` before parsing, with a one-line note on stderr.
DEPRECATED: dict[str, dict[str, str]] = {
    "export": {"--name": "--triton-name", "--backend": "--triton-backend", "--max-batch-size": "--triton-max-batch",
               "--instances": "--triton-instances", "--preferred-batch": "--triton-preferred-batch",
               "--max-queue-delay-us": "--triton-queue-delay-us", "--device": "--triton-device",
               "--sparsity": "--sparse-weights"},
    "verify": {"--model": "--served-model"},
    "profile": {"--model": "--served-model", "--batch": "--batch-sizes", "--json": "--report"},
    "benchmark": {"--verify-images": "--num-images"},
    "demo": {"--verify-images": "--num-images"},
    "prune": {"--eval-images": "--num-images"},
}


def modernize(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with this release's spellings, one note per old spelling found). `profile --json FILE` (a value that
    names a .json file) is the old `--report FILE`; `--json` alone is the new flag."""
    if not argv or argv[0] not in DEPRECATED:
        return argv, []
    renames, out, notes = DEPRECATED[argv[0]], [argv[0]], []
    args = argv[1:]
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        new = renames.get(flag)
        if new == "--report" and not (eq and value) and not (i + 1 < len(args) and args[i + 1].endswith(".json")):
            new = None  # the new `--json` flag
        if new is None or "--" in args[:i]:
            out.append(arg)
            continue
        notes.append(f"vitseg {argv[0]} {flag} is deprecated and will be removed in the next release: use {new}")
        out.append(new + (eq + value if eq else ""))
    return out, notes
