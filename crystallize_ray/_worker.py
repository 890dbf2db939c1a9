"""What runs inside a Ray worker process: a cache of experiments, and the task body.

A worker deserializes each experiment once (keyed by the object reference's id),
sets its steps up once, and reuses it for every task of that ``run()``. The last few
experiments are kept; an evicted one, and all of them at process exit, are torn down.
"""

from __future__ import annotations

import atexit
import logging
from collections import OrderedDict
from typing import Any

from crystallize import SerializationError
from crystallize.backend import (
    RunSpec,
    deserialize_experiment,
    is_interrupt,
    pack_results,
    steps_set_up,
)

log = logging.getLogger("crystallize_ray")

__all__ = ["make_task", "run_batch", "spec_pairs"]

_KEEP = 2
_LOADED: OrderedDict[str, tuple[Any, Any]] = OrderedDict()


def _experiment(ref: Any) -> Any:
    key = ref.hex()
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key][0]
    import ray

    try:
        experiment = deserialize_experiment(ray.get(ref))
    except BaseException as exc:
        if isinstance(exc, Exception) or is_interrupt(exc):
            raise
        # sys.exit() while unpickling would take the worker down and look like a
        # crash, retried again and again; it fails this task's runs instead.
        raise SerializationError(
            f"A Ray worker could not load the experiment: unpickling it raised "
            f"{type(exc).__name__}: {exc}. Check the __setstate__ or __reduce__ of the "
            f"experiment's steps and datasource, or run it under SerialExecution."
        ) from exc
    setup = steps_set_up(experiment)
    host = setup.__enter__()  # a failing setup() is recorded on every run by the host
    _LOADED[key] = (host, setup)
    while len(_LOADED) > _KEEP:
        _, (_, old) = _LOADED.popitem(last=False)
        _tear_down(old)
    return host


def _tear_down(setup: Any) -> None:
    """Tear an evicted experiment's steps down; nothing it raises reaches the task."""
    try:
        setup.__exit__(None, None, None)
    except BaseException as exc:  # even sys.exit(): this task's own runs are unaffected
        if is_interrupt(exc):
            raise
        log.exception("Tearing down an experiment's steps in a Ray worker failed")


def make_task(holder: list[Any], retry_errors: int) -> Any:
    """The task body for one ``run()``: a closure over the experiment's reference.

    The reference travels with the function definition, which Ray exports once per
    ``run()``; each task then carries only its ``(replicate, condition)`` pairs, and
    no argument refers to the object store (which measurably slows every task).
    """

    def crystallize_runs(batch: list[tuple[int, str]]) -> bytes:
        return run_batch(holder, batch, retry_errors)

    return crystallize_runs


def run_batch(holder: list[Any], batch: list[tuple[int, str]], retry_errors: int) -> bytes:
    """Execute a batch of runs of the experiment behind ``holder[0]`` (an ObjectRef).

    Returns the results packed by ``pack_results``: bytes are the cheapest thing
    for Ray to move, and a result that cannot be pickled fails only its own run.
    """
    host = _experiment(holder[0])
    results = []
    for replicate, condition in batch:
        run = host.run(replicate, condition)
        tries = 1
        while run.error is not None and tries <= retry_errors:
            run = host.run(replicate, condition)
            tries += 1
        run.attempts = tries
        results.append(run)
    return pack_results(results)


def spec_pairs(specs: list[RunSpec]) -> list[tuple[int, str]]:
    """Plain tuples are the cheapest thing to ship per task."""
    return [(s.replicate, s.condition) for s in specs]


@atexit.register
def _teardown_all() -> None:
    while _LOADED:
        _, (_, setup) = _LOADED.popitem()
        _tear_down(setup)
