"""The user's own modules travel by value with what is shipped to workers.

A worker has crystallize and the user's
installed packages, but not necessarily the directory a step was defined in (a test
module, a sibling ``helpers.py``, a notebook's folder): pickled by reference, such a
step would fail on the worker with ``ModuleNotFoundError``. So every module of the
user's that the experiment reaches — through its steps, data source, treatments and
plugins, the functions and classes they name, their closures, defaults and
attributes — is pickled by value (``cloudpickle.register_pickle_by_value``) while
the experiment is serialized, and only then. "The user's" means what the code
fingerprint calls so (see :mod:`crystallize.fingerprint`): any file outside the
standard library, the installed packages and crystallize itself.

cloudpickle writes code pickled by value as from ``<dynamic-code>``; the modules'
file names and source text travel along, and the receiving side puts both back (the
source into :mod:`linecache`), so a step's traceback on a worker shows its file and
lines, and its code fingerprint — hence its cache key — is the one the driver computes.
"""

from __future__ import annotations

import functools
import linecache
import pickle
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cloudpickle

from .fingerprint import _is_user_file

__all__ = ["dumps", "loads", "user_modules"]

# How many items of a container are searched for code (a registry of functions); a
# bigger one is data.
_CONTAINER_ITEMS = 64
# The most objects one search visits: a bound, not a goal.
_MAX_VISITS = 20_000
_BY_VALUE_LOCK = threading.RLock()


_TAG = "crystallize:shipped:1"


def dumps(obj: Any) -> bytes:
    """``obj`` with the user's modules by value, and their files' names and source."""
    modules = user_modules(obj)
    sources = {}
    for module in modules:
        filename = module.__file__ or ""
        lines = linecache.getlines(filename, module.__dict__)
        if lines:
            sources[module.__name__] = (filename, "".join(lines))
    with _by_value(modules):
        return cloudpickle.dumps((_TAG, sources, obj), protocol=5)


def loads(blob: bytes) -> Any:
    shipped = pickle.loads(blob)
    if not (isinstance(shipped, tuple) and len(shipped) == 3 and shipped[0] == _TAG):
        return shipped
    _, sources, obj = shipped
    if sources:
        for filename, text in sources.values():
            lines = text.splitlines(keepends=True)
            # mtime None: linecache keeps the entry even where the file does not exist
            linecache.cache[filename] = (len(text), None, lines, filename)
        _restore_filenames(obj, {name: filename for name, (filename, _) in sources.items()})
    return obj


def _restore_filenames(root: Any, files: dict[str, str]) -> None:
    """Give functions unpickled by value their module's file name back (see the module doc)."""
    seen: set[int] = set()
    todo = [root]
    visits = 0
    while todo and visits < _MAX_VISITS:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(obj))
        visits += 1
        try:
            if isinstance(obj, types.FunctionType):
                filename = files.get(obj.__module__)
                if filename is not None and obj.__code__.co_filename == "<dynamic-code>":
                    obj.__code__ = _with_filename(obj.__code__, filename)
                    todo.extend(obj.__globals__.values())
                todo.extend(cell.cell_contents for cell in obj.__closure__ or () if _filled(cell))
                todo.extend(obj.__defaults__ or ())
                todo.extend((obj.__kwdefaults__ or {}).values())
                todo.extend(obj.__dict__.values())
            elif isinstance(obj, (types.MethodType, staticmethod, classmethod)):
                todo.append(obj.__func__)
            elif isinstance(obj, property):
                todo.extend((obj.fget, obj.fset, obj.fdel))
            elif isinstance(obj, functools.partial):
                todo.extend((obj.func, *obj.args, *obj.keywords.values()))
            elif isinstance(obj, type):
                if obj.__module__ in files:
                    todo.extend(vars(obj).values())
                    todo.extend(obj.__mro__[1:])
            elif isinstance(obj, (list, tuple, set, frozenset)):
                if len(obj) <= _CONTAINER_ITEMS:
                    todo.extend(obj)
            elif isinstance(obj, dict):
                if len(obj) <= _CONTAINER_ITEMS:
                    todo.extend(obj.values())
            elif not isinstance(obj, types.ModuleType):
                todo.append(type(obj))
                attrs = getattr(obj, "__dict__", None)
                if isinstance(attrs, dict):
                    todo.extend(attrs.values())
        except Exception:  # only tracebacks and fingerprints would suffer
            continue


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(_with_filename(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def user_modules(*roots: Any) -> list[types.ModuleType]:
    """The user's own modules that ``roots`` reach, for pickling them by value.

    Follows functions (their module, the globals their code names, closures,
    defaults, ``__wrapped__``), classes (their module, methods and attributes, and
    those of the user's base classes), instances of the user's and crystallize's
    classes (their class and attributes), ``functools.partial`` and small
    containers. Standard-library, installed and crystallize modules are never listed;
    neither is ``__main__``, which cloudpickle always pickles by value.

    Example:
        >>> user_modules(len, [1, 2])
        []
    """
    found: dict[str, types.ModuleType] = {}
    seen: set[int] = set()
    todo: list[Any] = list(roots)
    visits = 0
    while todo and visits < _MAX_VISITS:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visits += 1
        try:
            _reach(obj, todo, found)
        except Exception:  # a search for modules never breaks shipping
            continue
    return list(found.values())


def _reach(obj: Any, todo: list[Any], found: dict[str, types.ModuleType]) -> None:
    """Note ``obj``'s module if it is the user's; queue what it refers to."""
    if isinstance(obj, (str, bytes, bytearray, int, float, complex, bool, type(None))):
        return
    if isinstance(obj, types.ModuleType):
        _note(obj, found)
        return
    if isinstance(obj, types.FunctionType):
        if not _note(sys.modules.get(obj.__module__), found):
            return  # a library's function: pickled by reference, nothing to follow
        namespace = obj.__globals__
        todo.extend(namespace[name] for name in _names(obj.__code__) if name in namespace)
        todo.extend(cell.cell_contents for cell in obj.__closure__ or () if _filled(cell))
        todo.extend(obj.__defaults__ or ())
        todo.extend((obj.__kwdefaults__ or {}).values())
        todo.extend(v for k, v in obj.__dict__.items() if k in ("__wrapped__", "__crystallize_function__"))
        return
    if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
        todo.append(obj.__func__)
        todo.append(getattr(obj, "__self__", None))
        return
    if isinstance(obj, property):
        todo.extend((obj.fget, obj.fset, obj.fdel))
        return
    if isinstance(obj, functools.partial):
        todo.extend((obj.func, *obj.args, *obj.keywords.values()))
        return
    if isinstance(obj, type):
        for cls in obj.__mro__:
            if _note(sys.modules.get(cls.__module__), found):
                todo.extend(vars(cls).values())
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        if len(obj) <= _CONTAINER_ITEMS:
            todo.extend(obj)
        return
    if isinstance(obj, dict):
        if len(obj) <= _CONTAINER_ITEMS:
            todo.extend(obj.values())
        return
    cls = type(obj)
    ours = (cls.__module__ or "").split(".")[0] in ("crystallize", "crystallize_ray")
    if ours or _note(sys.modules.get(cls.__module__), found):
        todo.append(cls)
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            todo.extend(attrs.values())
        for name in getattr(cls, "__slots__", ()):
            todo.append(getattr(obj, name, None))


def _note(module: Any, found: dict[str, types.ModuleType]) -> bool:
    """Record ``module`` if it is the user's; whether it is."""
    if not isinstance(module, types.ModuleType) or module.__name__ == "__main__":
        return False
    filename = getattr(module, "__file__", None)
    if not filename or not _is_user_file(filename):
        return False
    found.setdefault(module.__name__, module)
    return True


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents  # an empty cell (a name bound later) raises
    except ValueError:
        return False
    return True


@contextmanager
def _by_value(modules: list[types.ModuleType]) -> Iterator[None]:
    """Pickle ``modules`` by value inside the block; leave cloudpickle's registry as it was."""
    with _BY_VALUE_LOCK:
        added = []
        for module in modules:
            try:
                if module.__name__ not in cloudpickle.list_registry_pickle_by_value():
                    cloudpickle.register_pickle_by_value(module)
                    added.append(module)
            except (ValueError, AttributeError):  # not in sys.modules under its name
                continue
        try:
            yield
        finally:
            for module in added:
                try:
                    cloudpickle.unregister_pickle_by_value(module)
                except ValueError:
                    pass
