"""Code fingerprints: what a step's code is, for the code part of its cache key.

A function's fingerprint covers its own source and, transitively, the source of the
functions and classes and the values of the module constants (plain data and numpy
arrays) *of its own module* that it refers to by name, and the same kinds of values its
closure captured. Editing a helper therefore invalidates the steps that call it, and
steps made by one factory with different captured values never share entries, while
library code (another module) does not churn keys on every upgrade.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
import types
from typing import Any

from .hashing import hash_struct, hash_value

__all__ = ["code_fingerprint"]

_CONSTANT_TYPES = (str, bytes, int, float, complex, bool, type(None), tuple, frozenset)
_CONTAINER_TYPES = (list, dict, set)


def code_fingerprint(obj: Any) -> str:
    """Return a digest of the code behind a function or class and its local helpers.

    Args:
        obj: a function, method or class.

    Returns:
        A hex digest that changes when the code, or a same-module helper or constant
        it names, changes.

    Example:
        >>> def f(x):
        ...     return x + 1
        >>> code_fingerprint(f) == code_fingerprint(f)
        True
    """
    parts: list[Any] = []
    _collect(obj, parts, set())
    return hash_struct("code", parts)


def _collect(obj: Any, parts: list[Any], seen: set[int]) -> None:
    obj = _unwrap(obj)
    if id(obj) in seen:
        return
    seen.add(id(obj))
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    parts.append((name, _source_of(obj)))
    module = getattr(obj, "__module__", None)
    for code, namespace in _code_and_globals(obj):
        for ref in sorted(_names(code)):
            if ref in namespace:
                _collect_value(ref, namespace[ref], module, parts, seen)
    # Values a closure captured are as much a part of the code as module constants:
    # steps made by a factory (make_step(k)) differ only in them.
    for ref, value in _closure_values(obj):
        _collect_value(f"<closure>.{ref}", value, module, parts, seen)


def _collect_value(ref: str, value: Any, module: Any, parts: list[Any], seen: set[int]) -> None:
    target = _unwrap(value)
    if isinstance(target, (types.FunctionType, type)):
        if getattr(target, "__module__", None) == module:
            _collect(target, parts, seen)
    elif isinstance(value, _CONSTANT_TYPES + _CONTAINER_TYPES) or _is_ndarray(value):
        parts.append((ref, _constant_digest(value)))


def _is_ndarray(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _closure_values(obj: Any) -> list[tuple[str, Any]]:
    if not isinstance(obj, types.FunctionType) or not obj.__closure__:
        return []
    found = []
    for ref, cell in zip(obj.__code__.co_freevars, obj.__closure__):
        try:
            found.append((ref, cell.cell_contents))
        except ValueError:  # a cell not filled yet
            continue
    return found


def _unwrap(obj: Any) -> Any:
    """The user's function behind a step factory, a bound method or a decorator."""
    obj = getattr(obj, "__crystallize_function__", obj)
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    return inspect.unwrap(obj) if isinstance(obj, types.FunctionType) else obj


def _source_of(obj: Any) -> Any:
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        # No source on disk (a REPL, exec'd code): fall back to the compiled code.
        return [_code_digest(code) for code, _ in _code_and_globals(obj)]


def _code_and_globals(obj: Any) -> list[tuple[types.CodeType, dict[str, Any]]]:
    if isinstance(obj, types.FunctionType):
        return [(obj.__code__, obj.__globals__)]
    if isinstance(obj, type):
        found = []
        for attr in vars(obj).values():
            attr = getattr(attr, "__func__", attr)  # staticmethod / classmethod
            if isinstance(attr, property):
                attr = attr.fget
            if isinstance(attr, types.FunctionType):
                found.append((attr.__code__, attr.__globals__))
        return found
    return []


def _names(code: types.CodeType) -> set[str]:
    """Global names a code object and its nested functions/lambdas refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _code_digest(code: types.CodeType) -> Any:
    consts = [
        _code_digest(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts
    ]
    return [code.co_code, consts, list(code.co_names)]


def _constant_digest(value: Any) -> str:
    try:
        return hash_value(value)
    except Exception:  # an odd constant must not break fingerprinting
        return repr(type(value))
