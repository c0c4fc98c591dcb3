from __future__ import annotations

import io
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import pytest


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run `vitseg ARGS` in-process through the real entry point (main(), with its error handling)."""
    from vitseg_export.cli import common, main

    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["vitseg", *map(str, args)]
    old_consoles = common.console.file, common.err_console.file
    common.console.file, common.err_console.file = out, err
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        common.console.file, common.err_console.file = old_consoles
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here"))
        if item.get_closest_marker("trt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT: `import tensorrt` fails here (not installable on CI)"))
