"""Stable content hashes: xxh3-128 over a tagged, canonical encoding of a value.

Every value is written as a type tag and its content, so ``1``, ``1.0``, ``"1"``,
``b"1"``, ``bytearray(b"1")`` and ``[1]`` never collide. Sets and dicts are sorted (an
``OrderedDict`` keeps its order); dataclasses and subclasses of builtins keep their
type and every instance attribute; numpy arrays are dtype, shape and raw bytes (only
when numpy is already imported); classes and module-level functions are their
qualified names (their code is :mod:`crystallize.fingerprint`'s business). Anything
else is reduced as pickle would reduce it and the reduction is written canonically,
so a set inside an object is sorted like any other. A value with no canonical form
(a lambda, a lock, an open file) raises :class:`UnhashableValueError`: a digest never
depends on the process computing it. Golden tests pin the digests; changing an
encoding is a deliberate bump of :data:`CACHE_FORMAT_VERSION`.

Example:
    >>> hash_value({"b": 1, "a": [1.5, None]}) == hash_value({"a": [1.5, None], "b": 1})
    True
"""

from __future__ import annotations

import collections
import copyreg
import dataclasses
import enum
import pickle
import struct
import sys
import types
from array import array
from typing import Any

import xxhash

from .errors import CrystallizeError

__all__ = ["CACHE_FORMAT_VERSION", "UnhashableValueError", "hash_bytes", "hash_struct", "hash_value"]

#: Part of every cache key; bump it whenever an encoding below changes.
CACHE_FORMAT_VERSION = 2

# Pinned: what ``__reduce_ex__`` returns may depend on the protocol asked for.
_REDUCE_PROTOCOL = 4
# Buffers at least this large go straight to the hasher instead of being joined.
_DIRECT = 1 << 16
# Lists and tuples at least this long are tried for packing into one buffer.
_PACKED = 8
_PACK_DOUBLE = struct.Struct("<d").pack
_BUILTINS: tuple[Any, ...] = (int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset)


class UnhashableValueError(CrystallizeError, TypeError):
    """A value has no canonical encoding (a lambda, a local function, or an object
    that cannot be reduced or holds one that cannot: a lock, a file, a generator).

    ``value_type`` names the culprit's type, ``inside`` the objects holding it,
    innermost first. A cacheable step given such a value runs without the cache.

    Example:
        >>> import threading
        >>> try:
        ...     hash_value({"lock": threading.Lock()})
        ... except UnhashableValueError as exc:
        ...     print(exc.value_type)
        _thread.lock
    """

    def __init__(self, value_type: str, reason: str) -> None:
        super().__init__(value_type, reason)
        self.value_type = value_type
        self.reason = reason
        self.inside: list[str] = []

    def __str__(self) -> str:
        where = "".join(f" inside {name!r}" for name in self.inside)
        return (
            f"Cannot hash a value of type {self.value_type!r}{where}: {self.reason}. "
            f"The step runs without the cache; give it a __getstate__ or pass plain data."
        )


def hash_value(obj: Any) -> str:
    """Return the 32-hex-digit xxh3-128 digest of ``obj``'s canonical encoding.

    Args:
        obj: any value; plain data hashes by content, other objects by their
            canonical reduction (see the module docstring).

    Returns:
        The digest as lowercase hex; the same in every process.

    Raises:
        UnhashableValueError: ``obj`` (or something inside it) has no canonical form.

    Example:
        >>> hash_value({1, 2}) == hash_value({2, 1})
        True
        >>> hash_value(b"ab") == hash_value(bytearray(b"ab"))
        False
    """
    hasher = xxhash.xxh3_128()
    try:
        _Encoder(hasher, {}).encode(obj)
    except RecursionError as exc:  # a structure too deep, or one that reduces forever
        raise UnhashableValueError(_qualified_name(type(obj)), "it is nested too deeply") from exc
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
    """Return the xxh3-128 hex digest of raw bytes (no tag, no version).

    Example:
        >>> hash_bytes(b"abc") == hash_bytes(memoryview(b"abc"))
        True
    """
    return xxhash.xxh3_128_hexdigest(data)


class _Encoder:
    """Feeds the canonical encoding of one value into a hasher."""

    __slots__ = ("_active", "_hasher", "_parts")

    def __init__(self, hasher: Any, active: dict[int, int]) -> None:
        self._hasher = hasher
        self._parts: list[bytes | bytearray | memoryview] = []
        # id -> nesting depth of the containers being encoded right now; shared with
        # the encoders that compute sort keys, so a cycle through them is still seen.
        self._active = active

    def encode(self, obj: Any) -> None:
        self._value(obj)
        self._flush()

    # -- output ---------------------------------------------------------------
    def _emit(self, tag: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        size = len(payload)
        if size >= _DIRECT:
            self._parts.append(b"%s%d:" % (tag, size))
            self._flush()
            self._hasher.update(payload)
        else:
            # bytes.join takes any buffer, so a small payload is not copied here.
            self._parts += (b"%s%d:" % (tag, size), payload)

    def _flush(self) -> None:
        if self._parts:
            self._hasher.update(b"".join(self._parts))
            self._parts.clear()

    def _digest(self, obj: Any) -> str:
        """A sort key for ``obj``: its digest, seeing the cycles of the outer value."""
        hasher = xxhash.xxh3_128()
        _Encoder(hasher, self._active).encode(obj)
        return hasher.hexdigest()

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
        elif kind is bytes:
            self._emit(b"b", obj)
        elif kind is list or kind is tuple:
            self._sequence(b"l" if kind is list else b"t", obj)
        elif kind is dict:
            self._guarded(obj, self._mapping, obj)
        elif kind is set or kind is frozenset:
            self._guarded(obj, self._unordered, b"e" if kind is set else b"z", obj)
        else:
            self._other(obj)

    def _other(self, obj: Any) -> None:
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(obj, numpy.ndarray):
            self._ndarray(obj)
        elif numpy is not None and isinstance(obj, numpy.generic):
            self._emit(b"g" + obj.dtype.str.encode(), obj.tobytes())
        elif type(obj) is bytearray:
            self._emit(b"B", obj)
        elif isinstance(obj, memoryview):
            self._emit(b"m", f"{obj.format}|{obj.shape}".encode())
            self._emit(b"a", obj.cast("B") if obj.c_contiguous else obj.tobytes())
        elif isinstance(obj, enum.Enum):
            self._emit(b"n", _qualified_name(type(obj)).encode())
            self._value(obj.value)
        elif isinstance(obj, type):
            self._emit(b"G", _qualified_name(obj).encode())
        elif isinstance(obj, types.FunctionType):
            self._emit(b"G", _function_name(obj).encode())
        elif isinstance(obj, types.BuiltinFunctionType) and isinstance(
            getattr(obj, "__self__", None), (types.ModuleType, type(None))
        ):
            self._emit(b"G", f"{obj.__module__}.{obj.__qualname__}".encode())
        elif isinstance(obj, types.ModuleType):
            self._emit(b"M", obj.__name__.encode())
        elif isinstance(obj, pickle.PickleBuffer):
            self._emit(b"b", obj.raw())
        elif dataclasses.is_dataclass(obj):
            self._guarded(obj, self._dataclass, obj)
        elif isinstance(obj, _BUILTINS):
            self._guarded(obj, self._subclass, obj)
        else:
            self._guarded(obj, self._reduced, obj)

    # -- containers -----------------------------------------------------------
    def _sequence(self, tag: bytes, items: list | tuple) -> None:
        if len(items) >= _PACKED:
            kinds = set(map(type, items))
            packed = _pack_homogeneous(items, kinds)
            if packed is not None:
                kind, payload = packed
                self._emit(tag + kind, payload)
                return
            if kinds == {str}:
                # The same bytes as item by item, written by one comprehension.
                self._emit(tag, str(len(items)).encode())
                encoded = [item.encode("utf-8", "surrogatepass") for item in items]
                self._parts.append(b"".join([b"s%d:%s" % (len(b), b) for b in encoded]))
                return
        self._emit(tag, str(len(items)).encode())
        if type(items) is tuple:
            # Only a mutable container can close a cycle, and it is guarded itself.
            self._items(items)
        else:
            self._guarded(items, self._items, items)

    def _items(self, items: list | tuple) -> None:
        for item in items:
            self._value(item)

    def _mapping(self, mapping: dict) -> None:
        self._emit(b"d", str(len(mapping)).encode())
        if all(type(k) is str for k in mapping):
            keys = sorted(mapping)
        else:
            keys = sorted(mapping, key=self._digest)
        for key in keys:
            self._value(key)
            self._value(mapping[key])

    def _unordered(self, tag: bytes, items: set | frozenset) -> None:
        self._emit(tag, str(len(items)).encode())
        kinds = {type(item) for item in items}
        if len(kinds) == 1 and kinds <= {str, int, float, bytes}:
            ordered = sorted(items)
        else:
            ordered = sorted(items, key=self._digest)
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

    # -- objects --------------------------------------------------------------
    def _dataclass(self, obj: Any) -> None:
        names = [f.name for f in dataclasses.fields(obj)]
        self._emit(b"D", _qualified_name(type(obj)).encode())
        with _inside(obj):
            self._mapping({name: getattr(obj, name) for name in names})
            # Attributes set in __post_init__ or later are state as much as fields.
            self._mapping(_instance_state(obj, skip=names))

    def _subclass(self, obj: Any) -> None:
        """A subclass of a builtin: its type, its builtin content, its attributes."""
        name = _qualified_name(type(obj)).encode()
        with _inside(obj):
            if isinstance(obj, collections.OrderedDict):
                self._emit(b"o", name)
                self._emit(b"l", str(len(obj)).encode())
                for key, value in obj.items():
                    self._value(key)
                    self._value(value)
            elif isinstance(obj, collections.defaultdict):
                self._emit(b"y", name)
                self._default_factory(obj.default_factory)
                self._mapping(dict(obj))
            else:
                self._emit(b"u", name)
                self._value(_as_builtin(obj))
            self._mapping(_instance_state(obj))

    def _default_factory(self, factory: Any) -> None:
        try:
            self._value(factory)
        except UnhashableValueError:
            if not isinstance(factory, types.FunctionType):
                raise
            # defaultdict(lambda: 0) is common; its factory is named, not refused.
            self._emit(b"L", _qualified_name(factory).encode())

    def _reduced(self, obj: Any) -> None:
        """Anything else: pickle's reduction of ``obj``, written canonically."""
        # pickle's own order: a reducer registered with copyreg (numpy's ufuncs have
        # one), then the object's __reduce_ex__.
        reducer = copyreg.dispatch_table.get(type(obj))
        try:
            reduced = reducer(obj) if reducer else obj.__reduce_ex__(_REDUCE_PROTOCOL)
        except Exception as exc:
            raise UnhashableValueError(_qualified_name(type(obj)), str(exc)) from exc
        if isinstance(reduced, str):  # a module-level singleton, named
            module = getattr(obj, "__module__", None) or type(obj).__module__
            self._emit(b"G", f"{module}.{reduced}".encode())
            return
        if not isinstance(reduced, tuple) or not 2 <= len(reduced) <= 6:
            raise UnhashableValueError(_qualified_name(type(obj)), f"__reduce_ex__ returned {type(reduced).__name__}")
        rebuild, args, state, listitems, dictitems = (reduced + (None,) * 3)[:5]
        self._emit(b"R", str(len(reduced)).encode())
        with _inside(obj):
            self._value(rebuild)
            self._value(args)
            self._value(state)
            self._value(None if listitems is None else list(listitems))
            self._value(None if dictitems is None else dict(dictitems))

    def _guarded(self, container: Any, body: Any, *args: Any) -> None:
        """Run ``body(*args)``; a container met inside itself is a back-reference."""
        ident = id(container)
        depth = self._active.get(ident)
        if depth is not None:
            self._emit(b"^", str(depth).encode())
            return
        self._active[ident] = len(self._active)
        try:
            body(*args)
        finally:
            del self._active[ident]


class _inside:
    """Names ``obj`` in an UnhashableValueError raised while encoding its content."""

    __slots__ = ("_name",)

    def __init__(self, obj: Any) -> None:
        self._name = type(obj)

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, UnhashableValueError):
            exc.inside.append(_qualified_name(self._name))


def _pack_homogeneous(items: list | tuple, kinds: set[type]) -> tuple[bytes, memoryview] | None:
    """Pack a long list of only floats or only machine-size ints in one call."""
    if kinds == {float}:
        packed = array("d", items)
    elif kinds == {int}:
        try:
            packed = array("q", items)
        except OverflowError:
            return None
    else:
        return None
    if sys.byteorder != "little":
        packed.byteswap()
    return (b"F" if kinds == {float} else b"I"), memoryview(packed).cast("B")


def _instance_state(obj: Any, skip: Any = ()) -> dict[str, Any]:
    """``obj``'s instance attributes: its ``__dict__`` and filled slots."""
    state = {k: v for k, v in getattr(obj, "__dict__", {}).items() if k not in skip}
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__") or name in skip:
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{cls.__name__.lstrip('_')}{name}"
            try:
                state[name] = getattr(obj, name)
            except AttributeError:  # a slot never assigned
                continue
    return state


def _as_builtin(obj: Any) -> Any:
    for base in _BUILTINS:
        if isinstance(obj, base):
            return base(obj)
    return obj


def _function_name(fn: types.FunctionType) -> str:
    """The qualified name of a function that can be found again by that name."""
    found: Any = sys.modules.get(fn.__module__)
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not fn:
        raise UnhashableValueError(
            "builtins.function",
            f"{fn.__qualname__!r} in module {fn.__module__!r} cannot be found by its "
            f"name (a lambda, a local or a replaced function); define it at module level",
        )
    return _qualified_name(fn)


def _qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"
