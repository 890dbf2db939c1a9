"""Code fingerprints: what a step's code is, for the code part of its cache key.

A function's fingerprint covers its own code (source text and bytecode, so two
lambdas on one line differ) and, transitively, everything of the user's it reaches:

* the functions, classes and module constants it names, in its own module and in the
  user's other modules (``helpers.transform`` and ``from helpers import transform``
  alike); constants by content, whatever their type (a dataclass instance, a
  ``SimpleNamespace``: anything :func:`~crystallize.hashing.hash_value` can hash; what
  it cannot, by its type's name);
* the values its closure captured and its default arguments (functions among them
  followed as code), so steps made by one factory with different captured values
  differ;
* the function a decorator wrapped (``__wrapped__``) as well as the wrapper itself;
* for a class: the code of its methods and its plain class attributes, and those of
  its base classes up to, not including, crystallize's own classes and ``object``.

"The user's code" is any file outside the standard library and the installed
packages (the ``sysconfig`` and ``site`` directories) and outside crystallize itself;
code with no file (a REPL, ``exec``) counts as the user's. Library code is named,
never read, so upgrading a package does not churn keys. An editable install of
another project lives outside those directories and so counts as user code: its
edits invalidate too.

Only the expensive facts about a code object (its source, its bytecode digest, the
global names and attribute chains it reads) are remembered, once per code object;
the *values* behind those names are read and digested on every call, so rebinding a
module constant or mutating a module-level list between two runs in one process is
seen. The flip side: a module-level object a step mutates as it runs (a call counter,
a memo dict) changes the step's key too; give such an object a ``__getstate__`` that
leaves the changing part out, or give the step a ``version``. A part that cannot be
fingerprinted is written as a stable marker instead of failing.

Example:
    >>> def f(x):
    ...     return x + 1
    >>> code_fingerprint(f) == code_fingerprint(f)
    True
"""

from __future__ import annotations

import dis
import functools
import importlib.util
import inspect
import os
import site
import sys
import sysconfig
import textwrap
import types
import weakref
from pathlib import Path
from typing import Any

from .hashing import UnhashableValueError, hash_struct, hash_value

__all__ = ["code_fingerprint"]

# Small containers are searched for the functions they hold (a registry of
# operations); a big one is data and is only hashed.
_REGISTRY_SIZE = 64


def code_fingerprint(obj: Any) -> str:
    """Return a digest of the code behind a function or class and the user's code it uses.

    Cheap to call again: the source and bytecode of each function are read once per
    code object; only the values they refer to are digested again.

    Args:
        obj: a function, a method, a class, or a ``@pipeline_step`` factory.

    Returns:
        A hex digest that changes when that code, a helper or base class of the
        user's it reaches, or a value it reads from a module, closure or default
        changes.

    Example:
        >>> LIMIT = [1]
        >>> def g(x):
        ...     return x[: len(LIMIT)]
        >>> before = code_fingerprint(g)
        >>> LIMIT.append(2)
        >>> code_fingerprint(g) == before
        False
    """
    walker = _Walker()
    walker.root(obj)
    return hash_struct("code", walker.parts)


class _Walker:
    """Collects the parts of one fingerprint; each unit of code is visited once."""

    __slots__ = ("_seen", "parts")

    def __init__(self) -> None:
        # A flat list of strings, three per part: (kind, name, content).
        self.parts: list[str] = []
        self._seen: set[int] = set()

    def root(self, obj: Any) -> None:
        # The root is read as code even when it is a library's: it is the step.
        try:
            obj = getattr(obj, "__crystallize_function__", obj)  # a step factory
            if isinstance(obj, types.MethodType):
                obj = obj.__func__
            if isinstance(obj, types.FunctionType):
                self._function(obj)
            elif isinstance(obj, type):
                self._class(obj)
            else:
                self._value("<root>", obj)
        except Exception as exc:  # fingerprinting must never break a run
            self.parts += ("error", "<root>", type(exc).__name__)

    # -- units of code --------------------------------------------------------
    def _function(self, fn: types.FunctionType) -> None:
        if id(fn) in self._seen:
            return
        self._seen.add(id(fn))
        owner = f"{fn.__module__}.{fn.__qualname__}"
        static = _static(fn.__code__)
        self.parts += ("function", owner, static.digest)
        namespace = fn.__globals__
        for name, chains in static.names:
            if name in namespace:
                self._value(f"{owner}:{name}", namespace[name], chains)
        for name, attrs in static.imports:
            self._imported(owner, fn, name, attrs)
        if fn.__closure__:
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                try:
                    value = cell.cell_contents
                except ValueError:  # a cell not filled yet
                    continue
                self._value(f"{owner}:<closure>.{name}", value)
        for index, value in enumerate(fn.__defaults__ or ()):
            self._value(f"{owner}:<default>.{index}", value)
        for name, value in sorted((fn.__kwdefaults__ or {}).items()):
            self._value(f"{owner}:<default>.{name}", value)
        wrapped = fn.__dict__.get("__wrapped__")
        if wrapped is not None:
            self._value(f"{owner}:__wrapped__", wrapped)

    def _class(self, cls: type) -> None:
        if id(cls) in self._seen:
            return
        self._seen.add(id(cls))
        # Bases are named even when their code is a library's: changing them changes
        # what the class does.
        self.parts += ("class", _qualified_name(cls), " ".join(map(_qualified_name, cls.__mro__)))
        for base in cls.__mro__:
            if base is cls or _is_user_class(base):
                self._members(base)

    def _members(self, cls: type) -> None:
        owner = _qualified_name(cls)
        for name, attr in sorted(vars(cls).items()):
            code = _member_code(attr)
            if code:
                for fn in code:
                    self._function(fn)
            elif isinstance(attr, type) or not (name.startswith("__") and name.endswith("__")):
                # Nested classes and plain attributes; other dunders are machinery.
                self._value(f"{owner}.{name}", attr)

    # -- what a name refers to ------------------------------------------------
    def _value(self, ref: str, value: Any, chains: Any = ()) -> None:
        """Follow ``value`` if it is the user's code, else digest it as data."""
        try:
            self._follow(ref, value, chains)
        except Exception as exc:  # fingerprinting must never break a run
            self.parts += ("error", ref, type(exc).__name__)

    def _follow(self, ref: str, value: Any, chains: Any) -> None:
        target = getattr(value, "__crystallize_function__", value)
        if isinstance(target, types.FunctionType):
            if _is_user_file(target.__code__.co_filename):
                self._function(target)
            else:
                self.parts += ("library", ref, _qualified_name(target))
        elif isinstance(target, type):
            if _is_user_class(target):
                self._class(target)
            else:
                self.parts += ("library", ref, _qualified_name(target))
        elif isinstance(target, types.ModuleType):
            self._module(ref, target, chains)
        elif isinstance(target, types.MethodType):
            self._value(ref + ".__func__", target.__func__)
            self._value(ref + ".__self__", target.__self__)
        elif isinstance(target, functools.partial):
            self._value(ref + ".func", target.func)
            self._value(ref + ".args", target.args)
            self._value(ref + ".keywords", target.keywords)
        else:
            self._data(ref, target)

    def _data(self, ref: str, value: Any) -> None:
        kind = type(value)
        try:
            self.parts += ("value", ref, hash_value(value))
        except UnhashableValueError:
            # An object with no canonical form is named; its code may still be followed.
            self.parts += ("unhashable", ref, _qualified_name(kind))
        if kind in (list, tuple, dict, set, frozenset):
            if len(value) <= _REGISTRY_SIZE:
                items = value.values() if kind is dict else value
                for item in items:
                    if callable(item):
                        self._value(ref + "[]", item)
        elif _is_user_class(kind):
            self._class(kind)  # an instance's behaviour is its class's code
        # A library decorator's wrapper object (lru_cache, ...) keeps the function in
        # its __dict__; asking getattr could run a __getattr__ that invents one.
        wrapped = getattr(value, "__dict__", {}).get("__wrapped__")
        if wrapped is not None:
            self._value(ref + ".__wrapped__", wrapped)

    def _module(self, ref: str, module: types.ModuleType, chains: Any) -> None:
        if not _is_user_file(getattr(module, "__file__", None) or "<frozen>"):
            return  # a library module: its name is already in the bytecode
        for chain in sorted(chains):
            found: Any = module
            for depth, attr in enumerate(chain):
                found = getattr(found, attr, _ABSENT)
                if found is _ABSENT:
                    break
                if isinstance(found, types.ModuleType):
                    if not _is_user_file(getattr(found, "__file__", None) or "<frozen>"):
                        # A library module reached through a user one (``helpers.np.x``):
                        # not followed, as when the step names it directly. Its attributes
                        # may warn on access (numpy's ``np.object``): never the user's doing.
                        break
                    continue
                self._value(f"{ref}.{'.'.join(chain[: depth + 1])}", found)
                break

    def _imported(self, owner: str, fn: types.FunctionType, name: str, attrs: Any) -> None:
        """Follow ``from name import attrs`` (or ``import name``) inside a function."""
        try:
            resolved = importlib.util.resolve_name(name, fn.__globals__.get("__package__"))
        except (ImportError, ValueError):
            return
        module = sys.modules.get(resolved)
        if module is not None:
            self._module(f"{owner}:<import>.{resolved}", module, attrs)


_ABSENT = object()


# -- static facts about a code object, computed once ------------------------------------


class _Static:
    """What never changes for one code object: its digest and the names it reads."""

    __slots__ = ("digest", "imports", "names")

    def __init__(self, code: types.CodeType) -> None:
        self.digest = _code_digest(code)
        names: dict[str, set[tuple[str, ...]]] = {}
        imports: dict[str, set[tuple[str, ...]]] = {}
        try:
            _scan(code, names, imports)
        except Exception:  # an odd code object: fall back to every global name
            names = {n: {()} for n in _all_names(code)}
        self.names = tuple((n, frozenset(c)) for n, c in sorted(names.items()))
        self.imports = tuple((n, frozenset(a)) for n, a in sorted(imports.items()))


# id(code) -> (weak reference to it, its facts). Keyed by identity, not equality:
# equal code objects may come from different files.
_STATICS: dict[int, tuple[weakref.ref, _Static]] = {}


def _static(code: types.CodeType) -> _Static:
    key = id(code)
    entry = _STATICS.get(key)
    if entry is not None and entry[0]() is code:
        return entry[1]
    static = _Static(code)
    _STATICS[key] = (weakref.ref(code, functools.partial(_forget, key)), static)
    return static


def _forget(key: int, _gone: object) -> None:
    _STATICS.pop(key, None)


def _code_digest(code: types.CodeType) -> str:
    try:
        source: Any = textwrap.dedent(inspect.getsource(code))
    except Exception:  # no file (a REPL, exec'd code), or one inspect cannot parse
        source = None  # the bytecode alone then
    try:
        return hash_value((source, _bytecode(code)))
    except Exception:
        return hash_value((source, code.co_name))


def _bytecode(code: types.CodeType) -> Any:
    consts = [_bytecode(c) if isinstance(c, types.CodeType) else c for c in code.co_consts]
    return [code.co_code, consts, list(code.co_names), list(code.co_varnames), code.co_argcount]


def _scan(code: types.CodeType, names: dict[str, set], imports: dict[str, set]) -> None:
    """Global names ``code`` reads, each with the attribute chains read from it."""
    chain: list[str] | None = None
    module: str | None = None
    consts: list[Any] = []
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in ("LOAD_ATTR", "LOAD_METHOD") and chain is not None:
            chain.append(ins.argval)
            continue
        if chain is not None:
            names.setdefault(chain[0], set()).add(tuple(chain[1:]))
            chain = None
        if op in ("LOAD_GLOBAL", "LOAD_NAME"):
            chain = [ins.argval]
        elif op == "IMPORT_NAME":
            level = consts[-2] if len(consts) >= 2 and isinstance(consts[-2], int) else 0
            module = "." * level + ins.argval
            # ``import m`` alone: any attribute this code names may come from m.
            imports.setdefault(module, set()).update((n,) for n in code.co_names)
        elif op == "IMPORT_FROM" and module is not None:
            imports[module].add((ins.argval,))
        if op == "LOAD_CONST":
            consts.append(ins.argval)
    if chain is not None:
        names.setdefault(chain[0], set()).add(tuple(chain[1:]))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _scan(const, names, imports)


def _all_names(code: types.CodeType) -> set[str]:
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _all_names(const)
    return found


def _member_code(attr: Any) -> list[types.FunctionType]:
    """The functions behind a class member: a method, static/class method, property."""
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    if isinstance(attr, property):
        return [f for f in (attr.fget, attr.fset, attr.fdel) if isinstance(f, types.FunctionType)]
    if isinstance(attr, functools.cached_property):
        attr = attr.func
    return [attr] if isinstance(attr, types.FunctionType) else []


# -- whose code is it ---------------------------------------------------------------


def _is_user_class(cls: type) -> bool:
    module = cls.__module__ or ""
    if module == "builtins" or module.split(".")[0] in ("crystallize", "crystallize_ray"):
        return False
    filename = getattr(sys.modules.get(module), "__file__", None)
    if filename is None:
        # No module file (a class made by exec, or its module is gone): its methods say.
        codes = [f for attr in vars(cls).values() for f in _member_code(attr)]
        return bool(codes) and _is_user_file(codes[0].__code__.co_filename)
    return _is_user_file(filename)


@functools.lru_cache(maxsize=4096)
def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):
        return not filename.startswith("<frozen")  # frozen standard library modules
    path = os.path.realpath(filename)
    return not path.startswith(_library_roots())


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = [paths.get(key) for key in ("purelib", "platlib", "stdlib", "platstdlib")]
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # an embedded interpreter's reduced site module
        pass
    here = Path(__file__).resolve().parent
    roots += [str(here), str(here.parent / "crystallize_ray")]
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
