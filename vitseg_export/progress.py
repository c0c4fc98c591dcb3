"""The one progress protocol. Every long step of the library reports through a `Progress`:
`progress(message, done=None, total=None, **info)`: what it is doing, where counted how far (done of total),
and any figures worth showing beside it (an epoch's loss, a step's metrics). The CLI turns these into rich bars
and lines on stderr; the library never prints. A leaf of the import graph."""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """A progress callback (module docstring)."""

    def __call__(self, message: str, done: int | None = None, total: int | None = None, **info: Any) -> None: ...


def silent(message: str, done: int | None = None, total: int | None = None, **info: Any) -> None:
    """The default Progress: reports nothing."""
