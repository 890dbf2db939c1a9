"""Shipping an experiment to other processes: serialize once, and explain failures.

An experiment that cannot be pickled must fail before any work is submitted, with a
message that names the step (or datasource, treatment, plugin) and the attribute
that holds the unpicklable object.

The user's own modules travel by value: see :mod:`crystallize.by_value`.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import cloudpickle

from .by_value import dumps, loads, user_modules
from .errors import SerializationError
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
        return dumps(shipped)
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
        return dumps(shipped)
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
    return loads(blob)  # type: ignore[no-any-return]


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
    return loads(blob)


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
