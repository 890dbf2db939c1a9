"""Content hashing: canonical encodings and the golden digests every cache key rests on."""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _golden_values import GOLDEN_VALUES

import crystallize
from crystallize.errors import CrystallizeError
from crystallize.hashing import (
    CACHE_FORMAT_VERSION,
    UnhashableValueError,
    hash_bytes,
    hash_struct,
    hash_value,
)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float


@dataclasses.dataclass(frozen=True)
class OtherPoint:
    x: int
    y: float


def test_public_hash_value_is_the_hashing_module_function():
    assert crystallize.hash_value is hash_value
    assert crystallize.CACHE_FORMAT_VERSION == CACHE_FORMAT_VERSION


def test_digest_is_32_lowercase_hex_digits():
    digest = hash_value({"a": 1})
    assert len(digest) == 32
    assert digest == digest.lower()
    int(digest, 16)


# -- canonical forms ------------------------------------------------------------------


def test_dict_key_order_does_not_matter():
    assert hash_value({"a": 1, "b": [2, 3]}) == hash_value({"b": [2, 3], "a": 1})


def test_dict_with_mixed_key_types_is_order_independent():
    first = {1: "int", "1": "str", (1,): "tuple", None: "none"}
    second = dict(reversed(list(first.items())))
    assert list(first) != list(second)
    assert hash_value(first) == hash_value(second)


def _built_in_two_orders(kind, items):
    """Two equal sets whose iteration orders differ (so sorting is what makes them agree)."""
    forward, backward = set(), set()
    for item in items:
        forward.add(item)
    for item in reversed(items):
        backward.add(item)
    assert forward == backward and list(forward) != list(backward)
    return kind(forward), kind(backward)


# Ints congruent modulo the table size collide, so insertion order shows in iteration.
COLLIDING = [1, 33, 65, 97, 129]


def test_set_order_does_not_matter():
    assert hash_value({3, 1, 2}) == hash_value({1, 2, 3})
    for kind in (set, frozenset):
        first, second = _built_in_two_orders(kind, COLLIDING)
        assert hash_value(first) == hash_value(second)


def test_mixed_type_set_order_does_not_matter():
    for kind in (set, frozenset):
        first, second = _built_in_two_orders(kind, COLLIDING + ["a", (2, 3), None, 2.5, b"x"])
        assert hash_value(first) == hash_value(second)


def test_dict_key_insertion_order_with_colliding_keys_does_not_matter():
    first = {k: str(k) for k in COLLIDING}
    second = {k: str(k) for k in reversed(COLLIDING)}
    assert hash_value(first) == hash_value(second)


def test_nested_unordered_containers_are_canonical():
    left = {"outer": {"z": {1, 2}, "a": {"k": frozenset({"x", "y"})}}}
    right = {"outer": {"a": {"k": frozenset({"y", "x"})}, "z": {2, 1}}}
    assert hash_value(left) == hash_value(right)


@pytest.mark.parametrize(
    "left, right",
    [
        (1, 1.0),
        (1, "1"),
        (1, True),
        (1.0, True),
        ("1", b"1"),
        (0, False),
        (0, None),
        ("", None),
        ([1, 2], (1, 2)),
        ([], ()),
        ({1, 2}, frozenset({1, 2})),
        ({1, 2}, [1, 2]),
        ({"a": 1}, [("a", 1)]),
        ([1], 1),
        (["ab"], ["a", "b"]),
        ([[1, 2], [3]], [[1], [2, 3]]),
    ],
)
def test_values_that_look_alike_hash_differently(left, right):
    assert hash_value(left) != hash_value(right)


def test_long_homogeneous_lists_keep_type_distinctions():
    # Long lists of one scalar type take a packed fast path; it must keep the same
    # distinctions as the general encoding.
    ints = list(range(1000))
    floats = [float(i) for i in ints]
    bools = [bool(i % 2) for i in ints]
    assert hash_value(ints) != hash_value(floats)
    assert hash_value(ints) != hash_value(tuple(ints))
    assert hash_value(floats) != hash_value(tuple(floats))
    assert hash_value([i % 2 for i in ints]) != hash_value(bools)
    assert hash_value(ints) != hash_value(ints[:-1] + [1000])
    assert hash_value(floats) == hash_value([float(i) for i in range(1000)])


def test_long_lists_of_strings_keep_their_distinctions():
    words = [f"w{i}" for i in range(20)]
    assert hash_value(words) == hash_value([f"w{i}" for i in range(20)])
    assert hash_value(words) != hash_value(tuple(words))
    assert hash_value(words) != hash_value(words[:-1] + [b"w19"])
    assert hash_value(words) != hash_value(["".join(words)])
    assert hash_value(["ab", "c"] * 5) != hash_value(["a", "bc"] * 5)


def test_big_ints_are_hashed_by_value():
    big = [2**70 + i for i in range(10)]
    assert hash_value(big) == hash_value([2**70 + i for i in range(10)])
    assert hash_value(big) != hash_value([2**70 + i + 1 for i in range(10)])


def test_dataclasses_hash_by_type_and_fields():
    assert hash_value(Point(1, 2.0)) == hash_value(Point(1, 2.0))
    assert hash_value(Point(1, 2.0)) != hash_value(Point(1, 2.5))
    assert hash_value(Point(1, 2.0)) != hash_value(OtherPoint(1, 2.0))
    assert hash_value(Point(1, 2.0)) != hash_value({"x": 1, "y": 2.0})


def test_objects_of_unknown_types_hash_by_content():
    class Box:
        def __init__(self, value):
            self.value = value

    assert hash_value(Box([1, 2])) == hash_value(Box([1, 2]))
    assert hash_value(Box([1, 2])) != hash_value(Box([1, 3]))


def test_a_container_that_contains_itself_can_be_hashed():
    loop: list = [1, 2]
    loop.append(loop)
    assert hash_value(loop) == hash_value(loop)
    assert hash_value(loop) != hash_value([1, 2])


# -- numpy ---------------------------------------------------------------------------


def test_numpy_equal_arrays_hash_equal():
    assert hash_value(np.arange(10.0)) == hash_value(np.arange(10.0))
    assert hash_value(np.arange(10.0)) != hash_value(np.arange(1.0, 11.0))


def test_numpy_same_values_different_dtype_differ():
    assert hash_value(np.arange(4, dtype=np.int32)) != hash_value(np.arange(4, dtype=np.int64))
    assert hash_value(np.arange(4, dtype=np.int64)) != hash_value(np.arange(4, dtype=np.float64))
    # Same bytes, different dtype: 8 zero bytes are one int64 zero or one float64 zero.
    assert hash_value(np.zeros(1, dtype=np.int64)) != hash_value(np.zeros(1, dtype=np.float64))


def test_numpy_same_bytes_different_shape_differ():
    flat = np.arange(12)
    assert hash_value(flat) != hash_value(flat.reshape(3, 4))
    assert hash_value(flat.reshape(3, 4)) != hash_value(flat.reshape(4, 3))


def test_numpy_non_contiguous_equals_its_contiguous_copy():
    base = np.arange(40.0).reshape(5, 8)
    strided = base[:, ::3]
    assert not strided.flags.c_contiguous
    assert hash_value(strided) == hash_value(np.ascontiguousarray(strided))
    transposed = base.T
    assert hash_value(transposed) == hash_value(transposed.copy(order="C"))
    assert hash_value(np.asfortranarray(base)) == hash_value(base)


def test_numpy_array_is_not_its_list():
    assert hash_value(np.arange(3)) != hash_value([0, 1, 2])


def test_numpy_object_arrays_hash_by_content():
    left = np.array([{"a": 1}, [1, 2]], dtype=object)
    right = np.array([{"a": 1}, [1, 2]], dtype=object)
    assert hash_value(left) == hash_value(right)
    right[1] = [1, 3]
    assert hash_value(left) != hash_value(right)


def test_numpy_scalars_keep_their_dtype():
    assert hash_value(np.float32(1.5)) != hash_value(np.float64(1.5))
    assert hash_value(np.int64(3)) == hash_value(np.int64(3))


# -- tagged structures ----------------------------------------------------------------


def test_hash_struct_tags_separate_equal_parts():
    assert hash_struct("step", "a", 1) != hash_struct("input", "a", 1)
    assert hash_struct("step", "a", 1) != hash_struct("step", "a", 2)
    assert hash_struct("step", "a", 1) == hash_struct("step", "a", 1)


def test_hash_struct_includes_the_cache_format_version():
    expected = hash_value(("crystallize", CACHE_FORMAT_VERSION, "step", ("fn", {"k": 1})))
    bumped = hash_value(("crystallize", CACHE_FORMAT_VERSION + 1, "step", ("fn", {"k": 1})))
    assert hash_struct("step", "fn", {"k": 1}) == expected
    assert hash_struct("step", "fn", {"k": 1}) != bumped


def test_hash_bytes_is_xxh3_128_of_the_raw_bytes():
    import xxhash

    assert hash_bytes(b"crystallize") == xxhash.xxh3_128_hexdigest(b"crystallize")
    assert hash_bytes(memoryview(b"abc")) == hash_bytes(b"abc")


# -- no collisions from data ----------------------------------------------------------


@pytest.mark.parametrize(
    "left, right",
    [
        (b"ab", bytearray(b"ab")),
        (b"ab", memoryview(b"ab")),
        (bytearray(b"ab"), memoryview(b"ab")),
        (memoryview(b"abcd"), memoryview(b"abcd").cast("b")),
        (memoryview(b"abcd"), memoryview(b"abcd").cast("B", (2, 2))),
    ],
    ids=["bytes/bytearray", "bytes/memoryview", "bytearray/memoryview", "format", "shape"],
)
def test_byte_containers_keep_their_type(left, right):
    assert bytes(left) == bytes(right)
    assert hash_value(left) != hash_value(right)


def test_equal_byte_containers_of_one_type_agree():
    assert hash_value(bytearray(b"ab")) == hash_value(bytearray(b"ab"))
    strided = memoryview(b"abcdef")[::2]
    assert hash_value(strided) == hash_value(memoryview(b"ace"))


class Tagged(dict):
    pass


class Row(list):
    __slots__ = ("weight",)


class Count(int):
    pass


def test_a_builtin_subclass_keeps_its_type_and_its_attributes():
    plain, tagged = Tagged(a=1), Tagged(a=1)
    assert hash_value(plain) == hash_value(Tagged(a=1))
    assert hash_value(plain) != hash_value({"a": 1})
    tagged.note = "x"
    assert hash_value(tagged) != hash_value(plain)
    tagged.note = "y"
    first = hash_value(tagged)
    tagged.note = "x"
    assert hash_value(tagged) != first

    row = Row([1.0] * 10)
    assert hash_value(row) != hash_value([1.0] * 10)
    row.weight = 1
    heavier = Row([1.0] * 10)
    heavier.weight = 2
    assert hash_value(row) != hash_value(heavier)

    three = Count(3)
    three.unit = "m"
    assert hash_value(three) != hash_value(Count(3))
    assert hash_value(Count(3)) != hash_value(3)


def test_ordered_dict_is_order_sensitive_and_not_a_dict():
    first = collections.OrderedDict([("a", 1), ("b", 2)])
    second = collections.OrderedDict([("b", 2), ("a", 1)])
    assert hash_value(first) != hash_value(second)
    assert hash_value(first) == hash_value(collections.OrderedDict([("a", 1), ("b", 2)]))
    assert hash_value(first) != hash_value({"a": 1, "b": 2})


def test_defaultdict_includes_its_default_factory():
    of_lists = collections.defaultdict(list, a=[1])
    assert hash_value(of_lists) != hash_value(collections.defaultdict(tuple, a=[1]))
    assert hash_value(of_lists) != hash_value({"a": [1]})
    assert hash_value(of_lists) == hash_value(collections.defaultdict(list, a=[1]))
    # A lambda factory is common; it is named rather than refused.
    assert hash_value(collections.defaultdict(lambda: 0)) != hash_value(collections.defaultdict(int))


@dataclasses.dataclass
class Scaled:
    x: int

    def __post_init__(self) -> None:
        self.doubled = self.x * 2


def test_dataclasses_include_attributes_that_are_not_fields():
    made = Scaled(2)
    assert hash_value(made) == hash_value(Scaled(2))
    made.doubled = 5  # no longer what __post_init__ computed
    assert hash_value(made) != hash_value(Scaled(2))
    later = Scaled(2)
    later.extra = [1]
    assert hash_value(later) != hash_value(Scaled(2))


class Holder:
    def __init__(self, items) -> None:
        self.items = items


def test_an_object_is_hashed_through_its_canonical_reduction():
    first, second = _built_in_two_orders(set, COLLIDING)
    assert hash_value(Holder(first)) == hash_value(Holder(second))
    assert hash_value(Holder({1, 2})) != hash_value(Holder({1, 3}))
    assert hash_value(Holder({1, 2})) != hash_value(Tagged(items={1, 2}))
    nested_a = Holder({"k": Holder(first), "l": [Holder(None)]})
    nested_b = Holder({"l": [Holder(None)], "k": Holder(second)})
    assert hash_value(nested_a) == hash_value(nested_b)


def test_getstate_decides_what_an_object_contributes():
    class Model:
        def __init__(self, weights) -> None:
            self.weights = weights
            self.lock = threading.Lock()

        def __getstate__(self):
            return {"weights": self.weights}

    assert hash_value(Model([1, 2])) == hash_value(Model([1, 2]))
    assert hash_value(Model([1, 2])) != hash_value(Model([1, 3]))


def module_level_function(x):
    return x


def other_module_level_function(x):
    return x


def test_functions_and_classes_are_hashed_by_qualified_name():
    assert hash_value(module_level_function) == hash_value(module_level_function)
    assert hash_value(module_level_function) != hash_value(other_module_level_function)
    assert hash_value(len) != hash_value(max)
    assert hash_value(Holder) != hash_value(Scaled)
    assert hash_value({"fn": np.mean}) != hash_value({"fn": np.median})


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: lambda x: x, "builtins.function"),
        (lambda: threading.Lock(), "_thread.lock"),
        (lambda: (i for i in range(3)), "builtins.generator"),
        (lambda: open(__file__), "_io.TextIOWrapper"),
    ],
    ids=["lambda", "lock", "generator", "file"],
)
def test_values_without_a_canonical_form_raise_a_named_error(make, kind):
    value = make()
    try:
        with pytest.raises(UnhashableValueError, match="runs without the cache") as caught:
            hash_value({"key": [value]})
    finally:
        getattr(value, "close", lambda: None)()
    assert caught.value.value_type == kind
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, CrystallizeError)


def test_the_error_names_the_objects_holding_the_culprit():
    with pytest.raises(UnhashableValueError, match=r"'_thread.lock' inside '.*Holder' inside .*give it a __getstate__"):
        hash_value([Tagged(h=Holder(threading.Lock()))])


def test_a_local_function_is_refused_not_confused_with_another():
    def make(k):
        def scale(x):
            return x * k

        return scale

    with pytest.raises(UnhashableValueError, match="cannot be found by its name"):
        hash_value(make(1))


def test_objects_and_dicts_that_contain_themselves_can_be_hashed():
    loop: dict = {"a": 1}
    loop["self"] = loop
    assert hash_value(loop) == hash_value(loop)
    assert hash_value(loop) != hash_value({"a": 1, "self": None})

    node = Holder(None)
    node.items = {"me": node, "set": {1, 2}}
    other = Holder(None)
    other.items = {"me": other, "set": {2, 1}}
    assert hash_value(node) == hash_value(other)

    # A cycle through a set: the set's sort keys see the outer object.
    frozen = Holder(None)
    frozen.items = frozenset({frozen, 1})
    assert hash_value(frozen) == hash_value(frozen)


# -- golden digests -------------------------------------------------------------------
# These pin the exact encoding. Every cache entry on every user's disk is keyed by
# them: a change here must be a deliberate CACHE_FORMAT_VERSION bump (and then every
# digest below is recomputed and pasted in), never a side effect of a refactor.
# The values live in tests/_golden_values.py, so a fresh process can hash them too.

GOLDEN_VERSION = 2

GOLDEN_DIGESTS = {
    "none": "626d368fe0e74b4f1a038927df1311d6",
    "true": "1d33c0bd3511c80d20948828081ddcb4",
    "int": "08290220f98bbcacd580c4a0a523844e",
    "float": "9da619392aff67b6fc8c3eb68eb3e494",
    "str": "f1a4b4b4d3b756eb12b24d8b9cc5718b",
    "bytes": "d3f349a4f2b3d334f79e46d6bd260e89",
    "bytearray": "e96feb4c3569f8c72dca31f530689244",
    "memoryview": "c98874f222e8a5acdd96b2a10f7d84b9",
    "list": "35083e511e6749630616d4528585e212",
    "tuple": "b26188c5ae62258c0ca5d6a7996d9dc1",
    "dict": "a7a8294b2be08a76fa95dfd84815689a",
    "set": "a009cfd62caa9724ada2e17f9e0f8716",
    "set of strings": "64574fe630cd1e1c4104fb593a832de0",
    "packed floats": "c90c37f90b144ce7d2ac3961e209720e",
    "packed ints": "7477cd603ef4be75d44aa503b4d193fe",
    "list of strings": "2cd12d8deaaa6f3bb0bce4ec1392f47e",
    "ndarray": "0cc3808f6aced6d848e4aa6ea515696f",
    "dataclass": "2f34cfc21ae1111162ee87f127305746",
    "dataclass with extra attribute": "0e5e6ab63e45398c9a0a54931fbbac61",
    "ordered dict": "b0e8d52781bfdefadd7808bf23b8fcf7",
    "defaultdict": "1e8898931a694f12c0588b3b56bcf234",
    "dict subclass with attribute": "985a9e0f72e8e8f459822fa13ec80d44",
    "object holding a set of strings": "b4ebbc62ac695cc5b3b3a4162016f973",
    "object with slots": "e9e410799b0cdea1cadf04db65f0493f",
    "namespace": "ec1789fb7a8763573c638d0e10fb0b16",
    "self-referential list": "901b1c532e95cf59455508c023b63c07",
}

GOLDEN = [(label, value, GOLDEN_DIGESTS[label]) for label, value in GOLDEN_VALUES]


def test_golden_digests_belong_to_this_cache_format_version():
    assert CACHE_FORMAT_VERSION == GOLDEN_VERSION, (
        "CACHE_FORMAT_VERSION changed: recompute the golden digests in this file."
    )


@pytest.mark.parametrize("label, value, digest", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_digest(label, value, digest):
    assert hash_value(value) == digest


def test_golden_struct_digest():
    assert hash_struct("step", "mod.fn", "code", {"factor": 2}) == "9ba5c8518f784c743e5be7beab9acfcc"


@pytest.mark.parametrize("seed", ["0", "1", "12345"])
def test_golden_digests_hold_in_fresh_processes_under_any_hash_seed(seed):
    script = Path(__file__).with_name("_golden_values.py")
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": seed},
    )
    assert done.returncode == 0, done.stderr
    printed = dict(line.split("\t") for line in done.stdout.splitlines())
    assert printed == GOLDEN_DIGESTS
