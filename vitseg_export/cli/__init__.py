"""The `vitseg` command: the root app only wires the command modules; `main()` is the one place
that turns the project's exceptions into a one-line message, a hint and an exit code.

Every command module loads at start-up, so each declares the heavy library modules it calls with
`lazy_module` (imported on first use): `vitseg --help` stays fast, and `vitseg predict` on an artifact never
imports torch."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from typing import Annotated, NoReturn

import typer
from rich.text import Text

from vitseg_export import __version__
from vitseg_export.cli import demo as demo_cmd
from vitseg_export.cli import doctor as doctor_cmd
from vitseg_export.cli import export as export_cmd
from vitseg_export.cli import models as models_cmd
from vitseg_export.cli import predict as predict_cmd
from vitseg_export.cli import profile as profile_cmd
from vitseg_export.cli import prune as prune_cmd
from vitseg_export.cli import qat as qat_cmd
from vitseg_export.cli import serve as serve_cmd
from vitseg_export.cli import train as train_cmd
from vitseg_export.cli import verify as verify_cmd
from vitseg_export.cli.common import console, err_console
from vitseg_export.cli.options import modernize, opt, refresh_choices
from vitseg_export.errors import Terminated, VitsegError
from vitseg_export.export import quiet
from vitseg_export.files import remove_temp_files
from vitseg_export.images import max_image_pixels
from vitseg_export.machine.interrupt import abandoned_workers

app = typer.Typer(
    name="vitseg",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
COMMANDS = {"models": models_cmd.models, "train": train_cmd.train, "export": export_cmd.export,
            "verify": verify_cmd.verify, "predict": predict_cmd.predict, "demo": demo_cmd.demo,
            "doctor": doctor_cmd.doctor, "profile": profile_cmd.profile, "benchmark": profile_cmd.benchmark,
            "prune": prune_cmd.prune, "serve": serve_cmd.serve,
            "qat": qat_cmd.qat}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"vitseg {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, opt("--version", callback=_print_version, is_eager=True)] = False,
          verbose: Annotated[bool, opt("--verbose")] = False) -> None:
    """Export ViT/SegFormer segmentation models to ONNX, TensorRT, OpenVINO and Triton in fp32, fp16 or int8, and
    prove the masks still match PyTorch."""
    quiet.VERBOSE = verbose


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(Text.assemble(("warning: ", "yellow"), str(message)), soft_wrap=True)


def _fail(message: str, hint: str | None, code: int) -> NoReturn:
    """The one way the CLI reports a failure: one line on stderr (user text never read as markup), an exit code."""
    line = Text.assemble(("error: ", "bold red"), " ".join(message.split()))
    if hint:
        line.append(f" ({' '.join(hint.split())})", style="dim")
    try:
        err_console.print(line, soft_wrap=True)
    except UnicodeEncodeError:  # a stream that cannot take the text: the line, escaped, as bytes
        try:
            os.write(2, (line.plain + "\n").encode("ascii", "backslashreplace"))
        except OSError:  # stderr closed or full: the exit code still says it
            pass
    sys.exit(code)


# What allocators say when a size does not fit in memory (torch's CPU allocator, ONNX Runtime, OpenVINO's C++).
ALLOCATION_FAILURES = ("can't allocate memory", "failed to allocate memory", "bad_alloc", "bad allocation",
                       "out of memory")


def _streams_escape_what_they_cannot_encode() -> None:
    """Paths and names print on any terminal: characters the stream's encoding lacks come out as escapes
    (\\xe9) instead of failing the command (PYTHONIOENCODING=ascii, a C locale)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


_signals_received: list[int] = []


def _on_sigterm(signum, frame) -> None:
    _signals_received.append(signum)
    raise Terminated()


TRUE_VALUES, FALSE_VALUES = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def check_environment() -> None:
    """Every environment value vitseg reads, checked with the range it means (VitsegError naming it, never a
    silent default): VITSEG_DEBUG, VITSEG_MAX_IMAGE_PIXELS, and torchrun's WORLD_SIZE, RANK and LOCAL_RANK."""
    debug = os.environ.get("VITSEG_DEBUG")
    if debug is not None and debug.strip().lower() not in TRUE_VALUES + FALSE_VALUES:
        raise VitsegError(f"VITSEG_DEBUG={debug!r} is not a yes or no", "set it to 1 (tracebacks) or 0, or unset it")
    max_image_pixels()
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = os.environ.get(name)
        if text is not None:
            if not text.strip().isascii() or not text.strip().isdigit():
                raise VitsegError(f"{name}={text!r} is not a whole number >= 0", "torchrun sets it; unset it to run on one process")
            values[name] = int(text)
    world, rank = values.get("WORLD_SIZE"), values.get("RANK")
    if world is not None and world < 1:
        raise VitsegError(f"WORLD_SIZE={world} is not a number of processes >= 1", "torchrun sets it; unset it to run on one process")
    if (world or 1) > 1 and rank is None:
        raise VitsegError(f"WORLD_SIZE={world} without RANK", "start distributed training with torchrun, which sets both")
    if rank is not None and rank >= (world or 1):
        raise VitsegError(f"RANK={rank} is not below WORLD_SIZE={world or 1}", "start distributed training with torchrun, which sets both")


def _usage_error(e: BaseException) -> tuple[str, str, int] | None:
    """(message, hint, exit code) of a usage error from typer's parser, or None. Recognised by its interface
    (`exit_code` and `format_message()`), not its class: typer 0.29 raises its own vendored click classes
    and older typers click's, and `click` itself is not installed with typer 0.29, so it is never imported."""
    if not (callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int)):
        return None
    command = getattr(getattr(e, "ctx", None), "command_path", None) or "vitseg"
    # typer 0.29 words a wrong choice "Value error, 'x' is not one of 'a', 'b'." (its validator's own prefix)
    message = e.format_message().replace(": Value error, ", ": ").rstrip(".")  # type: ignore[attr-defined]
    return message, f"see `{command} --help`", e.exit_code  # type: ignore[attr-defined]


def _worker_message(message: str) -> str:
    """A VitsegError raised in a DataLoader worker comes back with the worker's traceback as its message:
    keep only the original error's own line."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _exit_for(e: BaseException, debug: bool) -> NoReturn:
    """Turn any exception that ended a command into one line and its documented exit code."""
    if isinstance(e, Terminated) or _signals_received:  # or what a kill caused first (e.g. a killed worker's error)
        kept = getattr(e, "kept", None)
        _fail("terminated (SIGTERM)", f"what was recorded so far is finished and kept: {', '.join(map(str, kept))}; "
              "nothing else was left behind" if kept else "no partial files were left behind", 143)
    if isinstance(e, (KeyboardInterrupt, typer.Abort)):
        _fail("interrupted", "no partial files were left behind", 130)
    if isinstance(e, VitsegError):
        if debug:
            raise e
        _fail(_worker_message(e.message), e.hint, e.exit_code)
    usage = _usage_error(e)
    if usage is not None:
        if type(e).__name__ == "NoArgsIsHelpError":  # `vitseg` alone: the help was the message (already shown by rich)
            if usage[0].strip():
                err_console.print(usage[0], markup=False, highlight=False)
            sys.exit(usage[2])
        _fail(*usage)
    if debug:
        raise e
    if isinstance(e, OSError):  # disk full, permission denied, ...: the environment, not a bug
        _fail(str(e) or type(e).__name__, "check the path, its permissions and the free space", 2)
    if isinstance(e, MemoryError) or any(m in str(e).lower() for m in ALLOCATION_FAILURES):
        _fail("out of memory", "use smaller images, a smaller --batch-size or a machine with more memory", 2)
    if isinstance(e, UnicodeEncodeError):  # a stream or file system that cannot encode a path
        _fail(f"a path or name cannot be encoded here ({e})", "use UTF-8 (PYTHONIOENCODING=utf-8, a UTF-8 locale)", 2)
    if type(e).__name__ == "DecompressionBombError":  # PIL: an image too large to decode safely
        _fail(str(e), "downscale the image", 2)
    _fail(f"{type(e).__name__}: {e}", "this is a bug in vitseg; VITSEG_DEBUG=1 shows the traceback", 1)


def check_no_repeated_option(args: list[str]) -> None:
    """Refuse an option given twice (`--precision int8 --precision fp32`, `-o a.onnx -o b.onnx`): click keeps the last
    value without a word, and the run then does what one of the two asked. VitsegError naming the option; options that
    take several values (`multiple`) may repeat. Arguments after `--` are not options."""
    if not args:
        return
    command = getattr(typer.main.get_command(app), "commands", {}).get(args[0])
    if command is None:
        return  # an unknown command: click says so
    # typer's own click: its options are the parameters with `opts` that are not positional arguments
    by_name = {name: p for p in command.params if getattr(p, "param_type_name", "") == "option"
               for name in (*p.opts, *p.secondary_opts)}
    seen: dict[str, str] = {}
    tokens = iter(args[1:])
    for token in tokens:
        if token == "--":
            break
        flag, eq, _ = token.partition("=")
        option = by_name.get(flag)
        if option is None:
            continue
        if option.name in seen and not option.multiple:
            said = seen[option.name]
            also = "" if said == flag else f" (as {said})"
            raise VitsegError(f"{flag} is given twice{also}; vitseg would keep only the last", f"give {flag} once")
        seen[str(option.name)] = flag
        if not option.is_flag and not option.count and not eq:
            next(tokens, None)  # its value, whatever it looks like


def _main() -> None:
    """The command behind `main`: usage errors and VitsegErrors exit 2 (3: verify failure), interrupts 130,
    SIGTERM 143, anything else 1, each with one line on stderr (VITSEG_DEBUG=1: the traceback). SIGTERM runs
    the same cleanup as Ctrl-C, and no temp file outlives the command."""
    warnings.showwarning = _show_warning
    _streams_escape_what_they_cannot_encode()
    debug = os.environ.get("VITSEG_DEBUG", "").strip().lower() in TRUE_VALUES
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # kills clean up like Ctrl-C
    _signals_received.clear()
    try:
        if sys.stdout is None:  # `vitseg ... >&-`: results would be lost
            raise VitsegError("stdout is closed, so vitseg's results would be lost", "run it with stdout open, or redirect it to a file")
        check_environment()  # environment values are checked before any command runs, like options
        refresh_choices()  # formats and backends registered since import are choices too
        args, notes = modernize(sys.argv[1:])  # this release's spellings for last release's
        for note in notes:
            err_console.print(Text.assemble(("deprecated: ", "yellow"), note), soft_wrap=True)
        check_no_repeated_option(args)
        code = app(args=args, standalone_mode=False, prog_name="vitseg")
    except SystemExit:
        raise
    except BaseException as e:
        _exit_for(e, debug)
    finally:
        remove_temp_files()
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if _signals_received:  # a SIGTERM whose exception something swallowed: the command still stops here
        _fail("terminated (SIGTERM)", "no partial files were left behind", 143)
    if code == 130:  # typer turns Ctrl-C into a silent exit code 130 (after every `finally` ran): say so
        _fail("interrupted", "no partial files were left behind", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _exit_at_once(code: object) -> NoReturn:
    """End the process now with `code` (SystemExit's), streams flushed, skipping the interpreter's finalization."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or broken: the exit code still says it
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def main() -> None:
    """Entry point of `vitseg` (see `_main`). Where Ctrl-C or SIGTERM left a library call running in an abandoned
    worker thread (machine.interrupt: a TensorRT build cannot be stopped from outside), the process ends with
    `os._exit` once the command's cleanup and its error line are done: Python's normal exit would finalize the
    interpreter, and the library's C++ statics, under the running build (seen: a segmentation fault, exit 139,
    after Ctrl-C in a TensorRT-RTX build). Only then: every other exit is Python's own."""
    try:
        _main()
    except SystemExit as e:
        if abandoned_workers():
            _exit_at_once(e.code)
        raise
