"""Third-party converters (onnxruntime.quantization, NVIDIA Model Optimizer, NNCF) log through handlers bound
to stdout and draw progress bars there; vitseg's stdout carries results (`--json`), so while they run their
output goes to stderr, and their chatter is cut to what matters. Nothing outlives the block: levels and
handler streams are put back (handlers a library creates during the block stay on stderr)."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

# logger-name prefix -> the level it logs at during the block ("" is the root logger: quantize_static warns
# about pre-processing through it on every call; Model Optimizer logs an NVML error on machines without a GPU)
QUIET_LEVELS = {"": logging.CRITICAL, "modelopt": logging.CRITICAL, "nncf": logging.WARNING}


def _loggers(prefix: str) -> list[logging.Logger]:
    if not prefix:
        return [logging.getLogger()]
    names = [n for n in logging.root.manager.loggerDict if n == prefix or n.startswith(prefix + ".")]
    return [logging.getLogger(n) for n in {prefix, *names}]


@contextlib.contextmanager
def library_output_on_stderr() -> Iterator[None]:
    """For the duration: stdout (Python level) goes to stderr, every logging handler bound to stdout writes to
    stderr, and the loggers in QUIET_LEVELS log only at their level."""
    loggers = [(lg, level) for prefix, level in QUIET_LEVELS.items() for lg in _loggers(prefix)]
    saved_levels = [(lg, lg.level) for lg, _ in loggers]
    handlers = [h for lg in [logging.getLogger(), *logging.root.manager.loggerDict.values()]
                if isinstance(lg, logging.Logger) for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__)]
    saved_streams = [(h, h.stream) for h in handlers]
    for lg, level in loggers:
        lg.setLevel(level)
    for h in handlers:
        h.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for lg, level in saved_levels:
            lg.setLevel(level)
        for h, stream in saved_streams:
            h.setStream(stream)


__all__ = ["QUIET_LEVELS", "library_output_on_stderr"]
