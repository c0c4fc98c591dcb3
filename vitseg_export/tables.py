"""The one kind of table vitseg keeps its extensible knowledge in (model families, architectures, formats,
precisions, backends): rows by name in registration order, and one clear error for a name it lacks.

Tables sit at the bottom of the import graph and import nothing they list: a row names its implementation as a
`"module:attr"` string (`lazy`), resolved the first time it is called. The same idea for modules whose import
is heavy or optional (torch, OpenVINO, TensorRT): `lazy_module("torch")` at the top of a file declares the
dependency where a reader looks for it, and imports it on first use (Polygraphy's `mod.lazy_import`)."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from vitseg_export.errors import VitsegError

Row = TypeVar("Row")


class Table(dict[str, Row], Generic[Row]):
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

    @contextmanager
    def scoped(self, *rows: Row) -> Iterator[tuple[Row, ...]]:
        """Register `rows` for the length of a block, then put the table back exactly as it was (rows they
        replaced included): how a test adds a format, backend or family."""
        saved = dict(self)
        try:
            yield tuple(self.register(row) for row in rows)
        finally:
            self.clear()
            self.update(saved)


class Lazy:
    """A callable named by `"module:attr"`, imported the first time it is called (or `resolve`d)."""

    def __init__(self, ref: str):
        module, sep, attr = ref.partition(":")
        if not (module and sep and attr):
            raise ValueError(f"a lazy reference is 'module:attr', not {ref!r}")
        self.ref, self._target = ref, None

    def resolve(self) -> Any:
        """The object the reference names (imported once)."""
        if self._target is None:
            module, _, attr = self.ref.partition(":")
            target: Any = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
            self._target = target
        return self._target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"lazy({self.ref!r})"


def lazy(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    """A table row's implementation: `"module:attr"` resolved on first call (a callable passes through)."""
    return Lazy(ref) if isinstance(ref, str) else ref


class _LazyModule(ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        return getattr(module, attr)


def lazy_module(name: str) -> ModuleType:
    """A module imported on first attribute access: `torch = lazy_module("torch")` at the top of a file declares
    a heavy or optional dependency without importing it (a missing one fails where it is used, with the
    caller's own message)."""
    return _LazyModule(name)
