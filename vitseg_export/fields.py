"""The one validator of fields read from files vitseg did not just write itself: an artifact's metadata, a
checkpoint's config.json, a model family's config. Each field is checked for its type and range and refused,
never coerced, with a one-line error naming the field, what it holds and what it should be."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from vitseg_export.errors import VitsegError

REQUIRED = object()  # a Field default: the field must be present


@dataclass(frozen=True)
class Field:
    """One field: its key, the check its value must pass, what that means in words, and its default when absent
    (REQUIRED: refused when absent)."""

    key: str
    check: Callable[[Any], bool]
    meaning: str
    default: Any = REQUIRED


def read_fields(data: Mapping[str, Any], fields: list[Field], where: str, hint: str,
                missing_hint: str | None = None) -> dict[str, Any]:
    """{key: value} of every field of `data`, each checked; VitsegError "<where>: <key> is <value>, not <meaning>"
    with `hint` (or "<where> has no <key>" with `missing_hint`, default `hint`) for the first that fails."""
    if not isinstance(data, Mapping):
        raise VitsegError(f"{where} is not a JSON object", hint)
    values = {}
    for f in fields:
        value = data.get(f.key, None)
        if value is None:
            if f.default is REQUIRED:
                raise VitsegError(f"{where} has no '{f.key}'", missing_hint or hint)
            value = f.default
        if not f.check(value):
            raise VitsegError(f"{where}: '{f.key}' is {json.dumps(value, default=str)[:60]}, not {f.meaning}", hint)
        values[f.key] = value
    return values


def is_text(value: Any) -> bool:
    """A string."""
    return isinstance(value, str)


def is_int(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """An int (bool is not) within [low, high] where given."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low) and \
        (high is None or value <= high)


def is_number(value: Any, positive: bool = False) -> bool:
    """A finite int or float (bool is not), > 0 when `positive`."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > 0 or not positive)


def numbers(count: int, positive: bool = False) -> Callable[[Any], bool]:
    """A check for a list of `count` finite numbers (> 0 when `positive`)."""
    return lambda v: isinstance(v, list) and len(v) == count and all(is_number(x, positive) for x in v)


def size_pair(low: int, high: int) -> Callable[[Any], bool]:
    """A check for [height, width]: two ints in low..high."""
    return lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x, low, high) for x in v)


def is_normalization(value: Any) -> bool:
    """{mean: [3 numbers], std: [3 positive numbers]}."""
    return isinstance(value, dict) and numbers(3)(value.get("mean")) and numbers(3, True)(value.get("std"))


def names_list(value: Any) -> bool:
    """A non-empty list of non-empty strings."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of a dataclass field's type hint (bool is not an int; floats are finite; tuples
    are JSON lists of their element types)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    return True
