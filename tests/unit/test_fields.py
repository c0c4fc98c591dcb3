"""fields.py, the one validator of values read from files vitseg did not write: every check at its edges, expected
values by hand (issue 37: the mutation run of the verdict core found this module untested by the unit tier)."""

from __future__ import annotations

import math
from typing import Optional

import pytest

from vitseg_export import fields
from vitseg_export.errors import VitsegError


@pytest.mark.parametrize("value, low, high, expected", [
    (3, None, None, True), (True, None, None, False), (3.0, None, None, False), ("3", None, None, False),
    (1, 1, 5, True), (5, 1, 5, True), (0, 1, 5, False), (6, 1, 5, False), (-7, None, 0, True), (1, None, 0, False)])
def test_is_int(value, low, high, expected):
    assert fields.is_int(value, low, high) is expected


@pytest.mark.parametrize("value, positive, expected", [
    (0, False, True), (0, True, False), (0.5, True, True), (-0.5, True, False), (-0.5, False, True),
    (math.inf, False, False), (math.nan, False, False), (False, False, False), ("1", False, False), (None, False, False)])
def test_is_number(value, positive, expected):
    assert fields.is_number(value, positive) is expected


def test_lists_of_numbers_and_size_pairs():
    three, positive = fields.numbers(3), fields.numbers(3, True)
    assert three([0, -1, 2.5]) and not three([0, 1]) and not three([0, 1, 2, 3]) and not three((0, 1, 2))
    assert not three([0, 1, math.nan]) and positive([1, 2, 3]) and not positive([1, 0, 3])
    pair = fields.size_pair(32, 64)
    assert pair([32, 64]) and not pair([31, 64]) and not pair([32, 65]) and not pair([32]) and not pair([32, 48, 48])
    assert not pair((32, 48)) and not pair([32.0, 48])


def test_normalization_names_and_text():
    assert fields.is_normalization({"mean": [0, 0, 0], "std": [1, 1, 1]})
    assert not fields.is_normalization({"mean": [0, 0, 0], "std": [1, 0, 1]})
    assert not fields.is_normalization({"mean": [0, 0], "std": [1, 1, 1]})
    assert not fields.is_normalization({"std": [1, 1, 1]}) and not fields.is_normalization([[0, 0, 0], [1, 1, 1]])
    assert fields.names_list(["a"]) and not fields.names_list([]) and not fields.names_list(["a", ""])
    assert not fields.names_list(["a", 1]) and not fields.names_list("ab")
    assert fields.is_text("") and not fields.is_text(b"x") and not fields.is_text(None)


@pytest.mark.parametrize("value, hint, expected", [
    (True, bool, True), (1, bool, False), (1, int, True), (True, int, False), (1.5, float, True), (1, float, True),
    (math.inf, float, False), ("a", str, True), (1, str, False), (None, type(None), True), (0, type(None), False),
    (None, Optional[int], True), (3, Optional[int], True), ("3", Optional[int], False), (3, int | str, True),
    ([1, 2], tuple[int, int], True), ([1], tuple[int, int], False), ([1, "a"], tuple[int, int], False),
    ((1, 2), tuple[int, int], True), (1, tuple[int, int], False), ([1, 2, 3], tuple[int, ...], True),
    ([1, "x"], tuple[int, ...], False), ([], tuple[int, ...], True), ({"a": 1}, dict, True)])
def test_matches_a_type_hint(value, hint, expected):
    assert fields.matches(value, hint) is expected


def test_read_fields_checks_each_field_and_names_the_first_that_fails():
    spec = [fields.Field("size", fields.size_pair(1, 10), "two ints in 1..10"),
            fields.Field("name", fields.is_text, "a string", default="x")]
    assert fields.read_fields({"size": [2, 3]}, spec, "cfg", "fix it") == {"size": [2, 3], "name": "x"}
    assert fields.read_fields({"size": [2, 3], "name": "y", "other": 1}, spec, "cfg", "fix it") == {"size": [2, 3], "name": "y"}
    with pytest.raises(VitsegError) as missing:
        fields.read_fields({"name": "y"}, spec, "cfg", "fix it", missing_hint="add it")
    assert missing.value.message == "cfg has no 'size'" and missing.value.hint == "add it"
    with pytest.raises(VitsegError) as missing_default_hint:
        fields.read_fields({"size": None}, spec, "cfg", "fix it")
    assert missing_default_hint.value.message == "cfg has no 'size'" and missing_default_hint.value.hint == "fix it"
    with pytest.raises(VitsegError) as bad:
        fields.read_fields({"size": [0, 3]}, spec, "cfg", "fix it")
    assert bad.value.message == "cfg: 'size' is [0, 3], not two ints in 1..10" and bad.value.hint == "fix it"
    with pytest.raises(VitsegError) as bad_default:
        fields.read_fields({"size": [1, 1]}, [fields.Field("n", fields.is_int, "an int", default="z")], "cfg", "h")
    assert bad_default.value.message == "cfg: 'n' is \"z\", not an int"
    with pytest.raises(VitsegError) as long_value:
        fields.read_fields({"size": "x" * 100}, spec, "cfg", "fix it")
    assert long_value.value.message == "cfg: 'size' is \"" + "x" * 59 + ", not two ints in 1..10"
    with pytest.raises(VitsegError) as not_object:
        fields.read_fields([1], spec, "cfg", "fix it")
    assert not_object.value.message == "cfg is not a JSON object"
