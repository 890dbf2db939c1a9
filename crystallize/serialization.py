"""Shipping an experiment to other processes: serialize once, and explain failures.

An experiment that cannot be pickled must fail before any work is submitted, with a
message that names the step (or datasource, treatment, plugin) and the attribute
that holds the unpicklable object.

The user's own modules travel by value. A worker has crystallize and the user's
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

import copy
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

from .errors import SerializationError
from .fingerprint import _is_user_file
from .plugins import BasePlugin
from .result import RunError, RunResult

__all__ = [
    "deserialize_experiment",
    "deserialize_step",
    "pack_results",
    "portable",
    "serialize_experiment",
    "serialize_step",
    "unpack_results",
    "user_modules",
]

# How many items of a container are searched for code (a registry of functions); a
# bigger one is data.
_CONTAINER_ITEMS = 64
# The most objects one search visits: a bound, not a goal.
_MAX_VISITS = 20_000
_BY_VALUE_LOCK = threading.RLock()


def serialize_experiment(experiment: Any, *, backend: str = "process/Ray") -> bytes:
    """Pickle ``experiment`` with cloudpickle, once, for shipping to workers.

    Only plugins with replicate hooks travel (see :func:`runs_in_workers`);
    hypotheses stay in the driver, where they are evaluated. The user's modules the
    experiment reaches travel by value (see the module docstring), so workers need
    neither the driver's ``sys.path`` nor its working directory.

    Raises:
        SerializationError: naming the part and attribute that cannot be pickled.
    """
    shipped = copy.copy(experiment)
    shipped.plugins = [p for p in experiment.plugins if runs_in_workers(p)]
    shipped.hypotheses = []  # evaluated in the driver only
    try:
        return _dumps(shipped)
    except Exception as exc:
        raise _explain(shipped, backend, exc) from exc


def serialize_step(step: Any, *extra: Any, backend: str = "Ray") -> bytes:
    """Pickle one step (and ``extra`` objects it needs, e.g. the setup context's values).

    A heavy step travels as its recipe (class and constructor arguments): unpickling
    it with :func:`deserialize_step` builds a fresh instance, whose ``setup()`` the
    receiver calls. The user's modules travel by value, as in
    :func:`serialize_experiment`.

    Returns:
        The bytes of ``(step, *extra)``.

    Raises:
        SerializationError: naming the step and the attribute that cannot be pickled.

    Example:
        >>> from crystallize import PipelineStep
        >>> class Model(PipelineStep):
        ...     heavy = True
        ...     def __init__(self, size):
        ...         self.size = size
        >>> step, config = deserialize_step(serialize_step(Model(3), {"lr": 0.1}))
        >>> step.size, config
        (3, {'lr': 0.1})
    """
    shipped = (step, *extra)
    try:
        return _dumps(shipped)
    except Exception as exc:
        attr, value = _culprit(step)
        where = f"attribute {attr!r} holds a {type(value).__name__}" if attr else f"{type(exc).__name__}: {exc}"
        raise SerializationError(
            f"Step {getattr(step, 'name', type(step).__name__)!r} could not be pickled for "
            f"{backend} execution: {where}. Load it in setup() or mark the step heavy "
            f"(heavy = True)."
        ) from exc


def deserialize_step(blob: bytes) -> tuple[Any, ...]:
    """The inverse of :func:`serialize_step`: ``(step, *extra)``; a heavy step is built here."""
    return _loads(blob)  # type: ignore[no-any-return]


_TAG = "crystallize:shipped:1"


def _dumps(obj: Any) -> bytes:
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


def _loads(blob: bytes) -> Any:
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


def runs_in_workers(plugin: Any) -> bool:
    """Whether a plugin has replicate hooks, so workers need a copy of it.

    Driver-only plugins (progress, artifacts, logging of results, the backend
    itself) stay in the driver and may hold anything, locks and threads included.
    """
    cls = type(plugin)
    return (
        cls.before_replicate is not BasePlugin.before_replicate or cls.after_replicate is not BasePlugin.after_replicate
    )


def deserialize_experiment(blob: bytes) -> Any:
    """The inverse of :func:`serialize_experiment`."""
    return _loads(blob)


def _explain(experiment: Any, backend: str, exc: Exception) -> SerializationError:
    parts: list[tuple[str, str, Any]] = [
        ("Step", getattr(step, "name", type(step).__name__), step) for step in experiment.pipeline.steps
    ]
    parts.append(("Data source", getattr(experiment.datasource, "name", "datasource"), experiment.datasource))
    parts += [("Treatment", t.name, t) for t in experiment.treatments]
    parts += [("Plugin", type(p).__name__, p) for p in experiment.plugins]
    parts += [("Hypothesis", h.name, h) for h in experiment.hypotheses]
    for kind, name, obj in parts:
        if _picklable(obj):
            continue
        attr, value = _culprit(obj)
        where = f"attribute {attr!r} holds a {type(value).__name__}" if attr else f"{type(exc).__name__}: {exc}"
        advice = (
            "Load it in setup() or mark the step heavy (heavy = True)."
            if kind == "Step"
            else "Create it inside the function that uses it, or keep it out of the experiment."
        )
        return SerializationError(f"{kind} {name!r} could not be pickled for {backend} execution: {where}. {advice}")
    return SerializationError(
        f"The experiment could not be pickled for {backend} execution "
        f"({type(exc).__name__}: {exc}). Check initial_ctx values."
    )


def _picklable(obj: Any) -> bool:
    try:
        cloudpickle.dumps(obj, protocol=5)
    except Exception:
        return False
    return True


def _culprit(obj: Any, depth: int = 0) -> tuple[str | None, Any]:
    """The first attribute path of ``obj`` whose value cannot be pickled."""
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict) or depth > 3:
        return None, obj
    for name, value in attrs.items():
        if not _picklable(value):
            inner, found = _culprit(value, depth + 1)
            return (f"{name}.{inner}" if inner else name), found
    return None, obj


def pack_results(runs: list[RunResult]) -> bytes:
    """Pickle a batch of results in the worker, for the trip back to the driver.

    Plain pickle is the fastest; cloudpickle carries what plain pickle cannot (a
    lambda that travelled here inside the experiment and ended up in a step's
    parameters); a result neither can pickle becomes a failed run of its own
    (:func:`portable`) instead of failing the batch or the experiment.
    """
    try:
        return pickle.dumps(runs, protocol=5)
    except Exception:
        try:
            return cloudpickle.dumps(runs, protocol=5)
        except Exception:
            return cloudpickle.dumps(portable(runs), protocol=5)


def unpack_results(blob: bytes) -> list[RunResult]:
    """The inverse of :func:`pack_results`, in the driver."""
    return pickle.loads(blob)


def portable(runs: list[RunResult]) -> list[RunResult]:
    """``runs`` with each result that cannot be pickled replaced by a failed run.

    A worker calls this before sending results back, so one metric holding a lock
    fails its own run (step ``"result"``) instead of the whole batch or experiment.
    """
    return [run if _picklable(run) else _unpicklable_result(run) for run in runs]


def _unpicklable_result(run: RunResult) -> RunResult:
    part = "the result"
    for name, values in run.metrics.items():
        if not _picklable(values):
            part = f"metric {name!r}"
            break
    else:
        for record in run.provenance:
            bad = [k for k, v in getattr(record, "params", {}).items() if not _picklable(v)]
            if bad:
                part = f"parameter {bad[0]!r} of step {record.name!r}"
                break
    return RunResult(
        replicate=run.replicate,
        condition=run.condition,
        seed=run.seed,
        seconds=run.seconds,
        error=run.error
        or RunError(
            replicate=run.replicate,
            condition=run.condition,
            step="result",
            type="SerializationError",
            message=(
                f"The run finished in a worker process, but its result could not be "
                f"pickled back to the driver: {part} holds a value that cannot be "
                f"pickled. Record plain values (numbers, strings, lists, arrays) as "
                f"metrics and step parameters."
            ),
        ),
    )
