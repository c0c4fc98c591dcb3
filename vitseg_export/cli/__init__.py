"""The `vitseg` command: the root app only wires the command modules; `main()` is the one place
that turns the project's exceptions into a one-line message, a hint and an exit code."""

from __future__ import annotations

import os
import sys
import warnings

import typer

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

app = typer.Typer(
    name="vitseg",
    help="Export ViT/SegFormer segmentation models to ONNX/TensorRT and prove the masks still match.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("models")(models_cmd.models)
app.command("train")(train_cmd.train)
app.command("export")(export_cmd.export)
app.command("verify")(verify_cmd.verify)
app.command("predict")(predict_cmd.predict)
app.command("demo")(demo_cmd.demo)
app.command("doctor")(doctor_cmd.doctor)
app.command("profile")(profile_cmd.profile)
app.command("benchmark")(profile_cmd.benchmark)
app.command("prune")(prune_cmd.prune)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def main() -> None:
    from vitseg_export.errors import VitsegError

    warnings.showwarning = _show_warning
    debug = os.environ.get("VITSEG_DEBUG") == "1"
    try:
        app(standalone_mode=False)
    except VitsegError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {e.message}" + (f" [dim]({e.hint})[/]" if e.hint else ""), highlight=False,
                          soft_wrap=True)
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unexpected: one line unless debugging
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show(file=sys.stderr)
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {e} [dim](set VITSEG_DEBUG=1 for the traceback)[/]",
                          highlight=False, soft_wrap=True)
        sys.exit(1)
