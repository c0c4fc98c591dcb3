"""The one kind of table vitseg keeps its extensible knowledge in (model families, architectures, formats,
precisions, backends): rows by name in registration order, and one clear error for a name it lacks."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from vitseg_export.errors import VitsegError

Row = TypeVar("Row")


class Table(dict[str, Row]):
    """A dict of rows, keyed by each row's `name`, with `register` and `row` (which raises a one-line
    VitsegError naming the known rows). `unknown` and `hint` are message templates with `{name}` and
    `{names}`; `listed` picks the names the hint offers (all by default)."""

    def __init__(self, unknown: str, hint: str, listed: Callable[[dict[str, Row]], Iterable[str]] = lambda t: t):
        super().__init__()
        self.unknown, self.hint, self.listed = unknown, hint, listed

    def register(self, row: Row) -> Row:
        """Add (or replace) a row under its `name`; returns it."""
        self[row.name] = row  # type: ignore[attr-defined]
        return row

    def row(self, name: str) -> Row:
        """The row called `name`; VitsegError naming the known ones when there is none."""
        try:
            return self[name]
        except KeyError:
            names = ", ".join(self.listed(self))
            raise VitsegError(self.unknown.format(name=name), self.hint.format(names=names)) from None
