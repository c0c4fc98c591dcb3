"""The `vitseg` command: the root app only wires the command modules; `main()` is the one place
that turns the project's exceptions into a one-line message, a hint and an exit code."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from typing import NoReturn

import typer
from rich.text import Text
from typer.exceptions import TyperException

from vitseg_export.cli import demo as demo_cmd
from vitseg_export.cli import doctor as doctor_cmd
from vitseg_export.cli import export as export_cmd
from vitseg_export.cli import models as models_cmd
from vitseg_export.cli import predict as predict_cmd
from vitseg_export.cli import profile as profile_cmd
from vitseg_export.cli import prune as prune_cmd
from vitseg_export.cli import train as train_cmd
from vitseg_export.cli import verify as verify_cmd
from vitseg_export.cli.common import err_console
from vitseg_export.errors import Terminated, VitsegError

app = typer.Typer(
    name="vitseg",
    help="Export ViT/SegFormer segmentation models to ONNX/TensorRT and prove the masks still match.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
COMMANDS = {"models": models_cmd.models, "train": train_cmd.train, "export": export_cmd.export,
            "verify": verify_cmd.verify, "predict": predict_cmd.predict, "demo": demo_cmd.demo,
            "doctor": doctor_cmd.doctor, "profile": profile_cmd.profile, "benchmark": profile_cmd.benchmark,
            "prune": prune_cmd.prune}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(Text.assemble(("warning: ", "yellow"), str(message)), soft_wrap=True)


def _fail(message: str, hint: str | None, code: int) -> NoReturn:
    """The one way the CLI reports a failure: one line on stderr (user text never read as markup), an exit code."""
    line = Text.assemble(("error: ", "bold red"), " ".join(message.split()))
    if hint:
        line.append(f" ({' '.join(hint.split())})", style="dim")
    err_console.print(line, soft_wrap=True)
    sys.exit(code)


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """Entry point of `vitseg`: usage errors and VitsegErrors exit 2 (3: verify failure), interrupts 130,
    SIGTERM 143, anything else 1, each with one line on stderr (VITSEG_DEBUG=1: the traceback)."""
    warnings.showwarning = _show_warning
    debug = os.environ.get("VITSEG_DEBUG") == "1"
    if threading.current_thread() is threading.main_thread():  # kills run the same cleanup as Ctrl-C
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)
    except VitsegError as e:
        if debug:
            raise
        _fail(e.message, e.hint, e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", "nothing was written", 130)
    except Terminated:
        _fail("terminated (SIGTERM)", "nothing was written", 143)
    except typer.Exit as e:
        code = e.exit_code
    except TyperException as e:  # usage errors (typer's own click): no `click` import, it may not be installed
        _fail(e.format_message(), "see `vitseg --help` or `vitseg COMMAND --help`", e.exit_code)
    except OSError as e:  # disk full, permission denied, ...: the environment, not a bug
        if debug:
            raise
        _fail(str(e) or type(e).__name__, "check the path, its permissions and the free space", 2)
    except Exception as e:
        if debug:
            raise
        _fail(f"{type(e).__name__}: {e}", "this is a bug in vitseg; VITSEG_DEBUG=1 shows the traceback", 1)
    if code == 130:  # typer turns Ctrl-C into a silent exit code 130 (after every `finally` ran): say so
        _fail("interrupted", "nothing was written", 130)
    sys.exit(code if isinstance(code, int) else 0)
