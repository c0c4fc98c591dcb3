"""Ctrl-C and SIGTERM during a long third-party call: the call runs in a worker thread, so the signal is always
raised in vitseg's own code, in the main thread, and never inside a library callback that would swallow it.

Why: Python runs signal handlers in the main thread only, between bytecodes. While a C++ library runs in the
main thread, the next bytecodes are often its callbacks into Python, and the handler's KeyboardInterrupt (or the
CLI's Terminated) is raised inside one of them. TensorRT's builder calls the Python `ILogger.log` of
`collecting_logger` all through `build_serialized_network`; an exception raised there is caught by TensorRT,
which prints "[ERROR] Exception caught in log(): KeyboardInterrupt" and carries on, so Ctrl-C was lost and the
export finished with exit 0 (SIGTERM's Terminated came out as a Python stack instead). With the call in a worker
thread, the main thread only waits (in short slices, so a signal is handled within SLICE_S wherever the kernel
delivered it) and the handler's exception comes out of that wait; callbacks run in the worker, where no handler
ever runs.

On an interrupt the worker cannot be stopped from outside while it is inside C++ code, so it is abandoned: a
daemon thread, it dies with the process (the CLI ends the process with `os._exit` while one is still running,
see `abandoned_workers`). A call that is Python between its C++ steps (a calibration loop: ONNX Runtime's
`quantize_static`, NNCF, Model Optimizer) can instead be given `unwind_s`: the same exception is then raised in
the worker at its next bytecode, and the main thread waits up to that long for the worker's `finally` blocks
(their temp dirs) before going on. A library whose callbacks swallow exceptions (TensorRT's logger) must not
get one: it would print the swallowed exception.

A leaf: the standard library only."""

from __future__ import annotations

import contextvars
import ctypes
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

SLICE_S = 0.1  # the main thread's longest wait between two chances to run a signal handler
# how long a Python-level call (a calibration loop) is given to unwind after an interrupt: its next bytecode
# comes within one inference, and its `finally` blocks remove its temp dirs
UNWIND_S = 5.0
_abandoned: list[threading.Thread] = []


class _Outcome:
    """What the worker left: fn's value or the exception it raised, and whether it is past fn (`finished`, set
    under `lock`; `done` is set when it is)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finished = False
        self.value: Any = None
        self.error: BaseException | None = None


def _raise_in(thread: threading.Thread, outcome: _Outcome, error: type[BaseException]) -> None:
    """Raise `error` in `thread` at its next Python bytecode, unless it is already past fn (its own code could
    not catch it there)."""
    with outcome.lock:
        if not outcome.finished and thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(error))


def _wait(outcome: _Outcome, seconds: float | None) -> None:
    """Wait until the worker is past fn (for at most `seconds`; None: however long) in SLICE_S slices: a signal
    delivered to another thread is handled in this one within a slice, and its handler's exception propagates
    from here. Not `Thread.join`: on Python 3.11 a join interrupted by a signal marks the thread stopped while it
    still runs (its `_wait_for_tstate_lock` releases the live thread's lock), so `is_alive()` would lie."""
    waited = 0.0
    while not outcome.done.wait(SLICE_S) and (seconds is None or waited < seconds):
        waited += SLICE_S


def run_interruptible(fn: Callable[..., T], /, *args: Any, unwind_s: float = 0.0, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a daemon worker thread while the main thread waits, so Ctrl-C and SIGTERM
    interrupt it promptly (the module docstring says why: TensorRT's logger callback swallowed them). Returns
    fn's value or re-raises its exception. On a signal, the handler's exception (KeyboardInterrupt, Terminated)
    propagates from here; with `unwind_s` > 0 the same exception is raised in the worker first and the worker is
    given that long to unwind; a worker still running is abandoned (`abandoned_workers`). Outside the main thread
    (no signal handler runs there) it is a plain call."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    outcome = _Outcome()
    context = contextvars.copy_context()  # the caller's context variables, as a direct call would see them

    def work() -> None:
        try:
            try:
                outcome.value = context.run(fn, *args, **kwargs)
            except BaseException as error:  # handed to the caller, whatever it is
                outcome.error = error
            with outcome.lock:
                outcome.finished = True
        except BaseException:  # an unwind request that landed after fn ended: nothing left to stop
            pass
        finally:
            outcome.done.set()

    worker = threading.Thread(target=work, name=f"vitseg-{getattr(fn, '__name__', 'call')}", daemon=True)
    worker.start()
    try:
        _wait(outcome, None)
    except BaseException as stop:
        try:
            if unwind_s > 0 and not outcome.done.is_set():
                _raise_in(worker, outcome, type(stop))
                _wait(outcome, unwind_s)  # a second signal ends this wait at once
        finally:
            if not outcome.done.is_set():
                _abandoned.append(worker)
        raise
    if outcome.error is not None:
        error, outcome.error = outcome.error, None  # no reference cycle through the traceback
        raise error
    return outcome.value


def abandoned_workers() -> list[threading.Thread]:
    """The workers an interrupt left running (still inside their library call). The process cannot finalize
    normally while one runs C++ code: Python would tear down under it, and at exit the library's C++ statics
    would be destroyed while it still uses them; the CLI ends such a process with `os._exit`."""
    return [worker for worker in _abandoned if worker.is_alive()]


__all__ = ["SLICE_S", "UNWIND_S", "abandoned_workers", "run_interruptible"]
