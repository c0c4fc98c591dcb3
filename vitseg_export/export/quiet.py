"""Third-party converters (onnxruntime.quantization, NVIDIA Model Optimizer, NNCF) log through handlers bound
to stdout and draw progress bars there; vitseg's stdout carries results (`--json`), so while they run their
output goes to stderr, and their chatter is cut to what matters. Nothing outlives the block: levels and
handler streams are put back (handlers a library creates during the block stay on stderr). Their INFO and
DEBUG records (Model Optimizer's AutoCast logs ~100 INFO lines per fp16 export) are dropped unless the user
asked for them (`vitseg --verbose`, which sets VERBOSE)."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

# logger-name prefix -> the level it logs at during the block ("" is the root logger: quantize_static warns
# about pre-processing through it on every call; Model Optimizer logs an NVML error on machines without a GPU)
QUIET_LEVELS = {"": logging.CRITICAL, "modelopt": logging.CRITICAL, "nncf": logging.WARNING}
VERBOSE = False  # `vitseg --verbose`: third-party libraries log at their own levels


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
    disabled = logging.root.manager.disable
    if not VERBOSE:
        for lg, level in loggers:
            lg.setLevel(level)
        # loggers a library creates inside the block (with levels of their own) are not in `loggers`
        logging.disable(max(disabled, logging.INFO))
    for h in handlers:
        h.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logging.disable(disabled)
        for lg, level in saved_levels:
            lg.setLevel(level)
        for h, stream in saved_streams:
            h.setStream(stream)


__all__ = ["QUIET_LEVELS", "VERBOSE", "library_output_on_stderr"]
