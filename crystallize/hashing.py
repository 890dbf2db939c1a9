"""Stable content hashes: xxh3-128 over a tagged, canonical encoding of a value.

Every value is written as a type tag followed by its content, so ``1``, ``1.0``,
``"1"`` and ``[1]`` never collide. Unordered collections are sorted, dataclasses are
encoded field by field, numpy arrays by dtype, shape and raw bytes (only when numpy is
already imported, and never by pickling), and anything else falls back to cloudpickle
at a pinned protocol. The digests are pinned by golden tests: changing how a value is
encoded is a deliberate bump of :data:`CACHE_FORMAT_VERSION`.

Example:
    >>> hash_value({"b": 1, "a": [1.5, None]}) == hash_value({"a": [1.5, None], "b": 1})
    True
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import sys
from array import array
from typing import Any

import cloudpickle
import xxhash

__all__ = ["CACHE_FORMAT_VERSION", "hash_bytes", "hash_struct", "hash_value"]

#: Part of every cache key; bump it whenever an encoding below changes.
CACHE_FORMAT_VERSION = 1

_PICKLE_PROTOCOL = 5
# Buffers at least this large go straight to the hasher instead of being joined.
_DIRECT = 1 << 16
_PACK_DOUBLE = struct.Struct("<d").pack


def hash_value(obj: Any) -> str:
    """Return the 32-hex-digit xxh3-128 digest of ``obj``'s canonical encoding.

    Args:
        obj: any value; plain data hashes by content, other objects by their pickle.

    Returns:
        The digest as lowercase hex.

    Example:
        >>> hash_value({1, 2}) == hash_value({2, 1})
        True
    """
    hasher = xxhash.xxh3_128()
    _Encoder(hasher).encode(obj)
    return hasher.hexdigest()


def hash_struct(tag: str, *parts: Any) -> str:
    """Hash a tagged structure, e.g. ``hash_struct("step", name, code, params)``.

    The cache-format version is always part of the digest.

    Example:
        >>> hash_struct("a", 1) != hash_struct("b", 1)
        True
    """
    return hash_value(("crystallize", CACHE_FORMAT_VERSION, tag, parts))


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """Return the xxh3-128 hex digest of raw bytes (used for entry checksums)."""
    return xxhash.xxh3_128_hexdigest(data)


class _Encoder:
    """Feeds the canonical encoding of one value into a hasher."""

    __slots__ = ("_hasher", "_parts", "_active")

    def __init__(self, hasher: Any) -> None:
        self._hasher = hasher
        self._parts: list[bytes] = []
        self._active: set[int] = set()

    def encode(self, obj: Any) -> None:
        self._value(obj)
        self._flush()

    # -- output ---------------------------------------------------------------
    def _emit(self, tag: bytes, payload: bytes | memoryview = b"") -> None:
        header = tag + str(len(payload)).encode() + b":"
        if len(payload) >= _DIRECT:
            self._parts.append(header)
            self._flush()
            self._hasher.update(payload)
        else:
            self._parts.append(header)
            self._parts.append(bytes(payload))

    def _flush(self) -> None:
        if self._parts:
            self._hasher.update(b"".join(self._parts))
            self._parts.clear()

    # -- dispatch -------------------------------------------------------------
    def _value(self, obj: Any) -> None:
        kind = type(obj)
        if obj is None:
            self._parts.append(b"N")
        elif kind is bool:
            self._parts.append(b"T" if obj else b"F")
        elif kind is int:
            self._emit(b"i", str(obj).encode())
        elif kind is float:
            self._emit(b"f", _PACK_DOUBLE(obj))
        elif kind is str:
            self._emit(b"s", obj.encode("utf-8", "surrogatepass"))
        elif kind in (bytes, bytearray):
            self._emit(b"b", obj)
        elif kind in (list, tuple):
            self._sequence(b"l" if kind is list else b"t", obj)
        elif kind is dict:
            self._mapping(obj)
        elif kind in (set, frozenset):
            self._unordered(b"e" if kind is set else b"z", obj)
        else:
            self._other(obj)

    def _other(self, obj: Any) -> None:
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(obj, numpy.ndarray):
            self._ndarray(obj)
        elif numpy is not None and isinstance(obj, numpy.generic):
            self._emit(b"g" + obj.dtype.str.encode(), obj.tobytes())
        elif isinstance(obj, enum.Enum):
            self._emit(b"n", _qualified_name(type(obj)).encode())
            self._value(obj.value)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self._emit(b"D", _qualified_name(type(obj)).encode())
            self._guarded(obj, lambda: self._mapping(
                {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            ))
        elif isinstance(obj, memoryview):
            self._emit(b"b", obj.cast("B") if obj.contiguous else obj.tobytes())
        elif isinstance(obj, (int, float, str, bytes, list, tuple, dict, set, frozenset)):
            # A subclass of a builtin: hash its type name, then its builtin content.
            self._emit(b"u", _qualified_name(type(obj)).encode())
            self._value(_as_builtin(obj))
        else:
            self._pickled(obj)

    # -- containers -----------------------------------------------------------
    def _sequence(self, tag: bytes, items: list | tuple) -> None:
        packed = _pack_homogeneous(items)
        if packed is not None:
            kind, payload = packed
            self._emit(tag + kind, payload)
            return
        self._emit(tag, str(len(items)).encode())
        self._guarded(items, lambda: [self._value(item) for item in items])

    def _mapping(self, mapping: dict) -> None:
        self._emit(b"d", str(len(mapping)).encode())
        if all(type(k) is str for k in mapping):
            keys = sorted(mapping)
        else:
            keys = sorted(mapping, key=hash_value)

        def body() -> None:
            for key in keys:
                self._value(key)
                self._value(mapping[key])

        self._guarded(mapping, body)

    def _unordered(self, tag: bytes, items: set | frozenset) -> None:
        self._emit(tag, str(len(items)).encode())
        kinds = {type(item) for item in items}
        if len(kinds) == 1 and kinds <= {str, int, float, bytes}:
            ordered = sorted(items)
        else:
            ordered = sorted(items, key=hash_value)
        for item in ordered:
            self._value(item)

    def _ndarray(self, arr: Any) -> None:
        if arr.dtype.hasobject:
            self._emit(b"Ao", str(arr.shape).encode())
            self._value(arr.tolist())
            return
        dtype = repr(arr.dtype.descr) if arr.dtype.fields else arr.dtype.str
        self._emit(b"A", f"{dtype}|{arr.shape}".encode())
        contiguous = arr if arr.flags.c_contiguous else arr.copy(order="C")
        self._emit(b"a", memoryview(contiguous.reshape(-1).view("u1")))

    def _pickled(self, obj: Any) -> None:
        self._emit(b"P", cloudpickle.dumps(obj, protocol=_PICKLE_PROTOCOL))

    def _guarded(self, container: Any, body: Any) -> None:
        """Run ``body``; a container that contains itself is hashed by its pickle."""
        ident = id(container)
        if ident in self._active:
            self._pickled(container)
            return
        self._active.add(ident)
        try:
            body()
        finally:
            self._active.discard(ident)


def _pack_homogeneous(items: list | tuple) -> tuple[bytes, bytes] | None:
    """Pack a long list of only floats or only machine-size ints in one call."""
    if len(items) < 8:
        return None
    kinds = set(map(type, items))
    if kinds == {float}:
        return b"F", struct.pack(f"<{len(items)}d", *items)
    if kinds == {int}:
        try:
            packed = array("q", items)
        except OverflowError:
            return None
        if sys.byteorder != "little":
            packed.byteswap()
        return b"I", packed.tobytes()
    return None


def _as_builtin(obj: Any) -> Any:
    for base in (bool, int, float, str, bytes, list, tuple, dict, set, frozenset):
        if isinstance(obj, base):
            return base(obj)
    return obj


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
