"""The values whose digests tests/test_hashing.py pins, importable by a fresh process.

Classes here hash by qualified name, so each one's ``__module__`` is pinned: the
digests must not depend on whether this file is imported as ``_golden_values`` or
``tests._golden_values``. Run as a script, it prints ``label digest`` per line (the
hash-seed test runs it under several ``PYTHONHASHSEED`` values).
"""

from __future__ import annotations

import collections
import dataclasses
import types

import numpy as np


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float


@dataclasses.dataclass
class Scaled:
    x: int

    def __post_init__(self) -> None:
        self.doubled = self.x * 2  # not a field, but part of the value


class Tagged(dict):
    """A dict subclass with an instance attribute."""


class Holder:
    """A plain object: hashed through its reduction, with the set inside it sorted."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.label = "holder"


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a: int) -> None:
        self.a = a  # b is never assigned


for _cls in (Point, Scaled, Tagged, Holder, Slotted):
    _cls.__module__ = "crystallize_golden"


def _tagged() -> Tagged:
    value = Tagged(a=1)
    value.note = "x"
    return value


def _loop() -> list:
    loop: list = [1, 2]
    loop.append(loop)
    return loop


# Enough strings that their set's iteration order differs between hash seeds.
WORDS = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}

GOLDEN_VALUES = [
    ("none", None),
    ("true", True),
    ("int", 1),
    ("float", 1.0),
    ("str", "1"),
    ("bytes", b"\x00\x01"),
    ("bytearray", bytearray(b"\x00\x01")),
    ("memoryview", memoryview(b"\x00\x01")),
    ("list", [1, 2, 3]),
    ("tuple", (1, "a", None)),
    ("dict", {"b": 1, "a": [1.5, None]}),
    ("set", {3, 1, 2}),
    ("set of strings", frozenset(WORDS)),
    ("packed floats", [i / 4 for i in range(10)]),
    ("packed ints", list(range(10))),
    ("list of strings", [f"w{i}" for i in range(10)]),
    ("ndarray", np.arange(6, dtype="<i8").reshape(2, 3)),
    ("dataclass", Point(1, 2.5)),
    ("dataclass with extra attribute", Scaled(3)),
    ("ordered dict", collections.OrderedDict([("b", 1), ("a", 2)])),
    ("defaultdict", collections.defaultdict(list, {"a": [1]})),
    ("dict subclass with attribute", _tagged()),
    ("object holding a set of strings", Holder(set(WORDS))),
    ("object with slots", Slotted(1)),
    ("namespace", types.SimpleNamespace(words=set(WORDS), n=2)),
    ("self-referential list", _loop()),
]


if __name__ == "__main__":
    from crystallize import hash_value

    for label, value in GOLDEN_VALUES:
        print(f"{label}\t{hash_value(value)}")
