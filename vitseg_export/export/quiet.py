"""Third-party converters (onnxruntime.quantization, NVIDIA Model Optimizer, NNCF) log through handlers bound
to stdout and draw progress bars there; vitseg's stdout carries results (`--json`), so while they run their
output goes to stderr, and their chatter is cut to what matters. Nothing outlives the block: levels and
handler streams are put back (handlers a library creates during the block stay on stderr). Their INFO and
DEBUG records (Model Optimizer's AutoCast logs ~100 INFO lines per fp16 export), their prints ("Inserted 158
quantizers") and the Python warnings raised from their code (Model Optimizer's "transformers X is not tested",
torch's jit deprecation it triggers) are dropped unless the user asked for them (`vitseg --verbose`, which sets
VERBOSE); vitseg's own warnings are kept."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

# logger-name prefix -> the level it logs at during the block ("" is the root logger: quantize_static warns
# about pre-processing through it on every call; Model Optimizer logs an NVML error on machines without a GPU;
# torch's cpp_extension warns "No CUDA runtime is found" when Model Optimizer imports it on a CPU machine)
QUIET_LEVELS = {"": logging.CRITICAL, "modelopt": logging.CRITICAL, "nncf": logging.WARNING,
                "torch.utils.cpp_extension": logging.ERROR}
# the modules whose Python warnings are dropped: the libraries the block runs, and what they call
QUIET_WARNINGS_FROM = r"(modelopt|nncf|onnxruntime|openvino|torch|transformers|onnx)(\.|$)"
VERBOSE = False  # `vitseg --verbose`: third-party libraries log at their own levels


def _loggers(prefix: str) -> list[logging.Logger]:
    if not prefix:
        return [logging.getLogger()]
    names = [n for n in logging.root.manager.loggerDict if n == prefix or n.startswith(prefix + ".")]
    return [logging.getLogger(n) for n in {prefix, *names}]


def library_log_level() -> str:
    """The level for a library call that takes one and configures its loggers with it on every call (Model
    Optimizer's `quantize(log_level=...)`, which otherwise logs "ERROR - Failed to get GPU count" on a machine
    without a GPU, in an export that succeeds)."""
    return "INFO" if VERBOSE else "CRITICAL"


@contextlib.contextmanager
def library_output_on_stderr() -> Iterator[None]:
    """For the duration: stdout (Python level) goes to stderr (unless VERBOSE: nowhere), every logging handler
    bound to stdout writes to stderr, the loggers in QUIET_LEVELS log only at their level, and warnings raised from
    QUIET_WARNINGS_FROM are dropped (unless VERBOSE)."""
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
        with contextlib.ExitStack() as stack:
            if VERBOSE:
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            else:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", module=QUIET_WARNINGS_FROM)
            yield
    finally:
        logging.disable(disabled)
        for lg, level in saved_levels:
            lg.setLevel(level)
        for h, stream in saved_streams:
            h.setStream(stream)


__all__ = ["QUIET_LEVELS", "QUIET_WARNINGS_FROM", "VERBOSE", "library_log_level", "library_output_on_stderr"]
