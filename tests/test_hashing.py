"""Content hashing: canonical encodings and the golden digests every cache key rests on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import crystallize
from crystallize.hashing import CACHE_FORMAT_VERSION, hash_bytes, hash_struct, hash_value


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float


@dataclasses.dataclass(frozen=True)
class OtherPoint:
    x: int
    y: float


@dataclasses.dataclass(frozen=True)
class GoldenPoint:
    x: int
    y: float


# A dataclass hashes its qualified name; pin it so the golden digest does not depend on
# how pytest names this module.
GoldenPoint.__module__ = "crystallize_golden"
GoldenPoint.__qualname__ = "Point"


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


# -- golden digests -------------------------------------------------------------------
# These pin the exact encoding. Every cache entry on every user's disk is keyed by
# them: a change here must be a deliberate CACHE_FORMAT_VERSION bump (and then every
# digest below is recomputed and pasted in), never a side effect of a refactor.

GOLDEN_VERSION = 1

GOLDEN = [
    ("none", None, "626d368fe0e74b4f1a038927df1311d6"),
    ("true", True, "1d33c0bd3511c80d20948828081ddcb4"),
    ("int", 1, "08290220f98bbcacd580c4a0a523844e"),
    ("float", 1.0, "9da619392aff67b6fc8c3eb68eb3e494"),
    ("str", "1", "f1a4b4b4d3b756eb12b24d8b9cc5718b"),
    ("bytes", b"\x00\x01", "d3f349a4f2b3d334f79e46d6bd260e89"),
    ("list", [1, 2, 3], "35083e511e6749630616d4528585e212"),
    ("tuple", (1, "a", None), "b26188c5ae62258c0ca5d6a7996d9dc1"),
    ("dict", {"b": 1, "a": [1.5, None]}, "a7a8294b2be08a76fa95dfd84815689a"),
    ("set", {3, 1, 2}, "a009cfd62caa9724ada2e17f9e0f8716"),
    ("packed floats", [i / 4 for i in range(10)], "c90c37f90b144ce7d2ac3961e209720e"),
    ("packed ints", list(range(10)), "7477cd603ef4be75d44aa503b4d193fe"),
    ("ndarray", np.arange(6, dtype="<i8").reshape(2, 3), "0cc3808f6aced6d848e4aa6ea515696f"),
    ("dataclass", GoldenPoint(1, 2.5), "bc0a1be27a7a4dd4850ebc5a32e4616e"),
]


def test_golden_digests_belong_to_this_cache_format_version():
    assert CACHE_FORMAT_VERSION == GOLDEN_VERSION, (
        "CACHE_FORMAT_VERSION changed: recompute the golden digests in this file."
    )


@pytest.mark.parametrize("label, value, digest", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_digest(label, value, digest):
    assert hash_value(value) == digest


def test_golden_struct_digest():
    assert hash_struct("step", "mod.fn", "code", {"factor": 2}) == "77fcd041061e8e393649cb95c887f838"
