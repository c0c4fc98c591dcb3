"""The project's exception types. The CLI turns them into one red line, a hint and an exit code."""

from __future__ import annotations


class VitsegError(Exception):
    """A problem the user can fix: the message names it, the hint says how. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class CheckpointError(VitsegError):
    """A checkpoint is missing, damaged, or of another architecture."""


class DataError(VitsegError):
    """A data spec names nothing usable."""


class BackendMissingError(VitsegError):
    """An optional backend (onnxruntime, TensorRT, CUDA) is not installed or not usable here."""


class ParityError(VitsegError):
    """An artifact's outputs differ from the PyTorch reference beyond the allowed limits."""

    exit_code = 3


class Int8NotWorthIt(VitsegError):
    """An int8 artifact that would not be int8 in anything but name (mostly float, or slower than fp32 where it
    runs): refused unless --allow-float-fallback. The benchmark shows such a row as skipped, with the reason.
    Exit code 3, as a parity failure: the artifact asked for is not one vitseg will call int8."""

    exit_code = 3


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every `finally` (temp files, temp dirs) runs as for Ctrl-C. `kept`: the
    outputs a command finished and kept on its way out (a live video recorded so far), which the error line names."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list = []

