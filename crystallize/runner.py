"""Executing one run: a pure function of (experiment, replicate, condition) -> RunResult.

Every backend calls :func:`execute_run` (or :func:`aexecute_run`) wherever it runs
work; nothing a run does escapes except through the RunResult it returns. A failure
anywhere in the run is caught and becomes the RunResult's ``error``.
"""

from __future__ import annotations

import inspect
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._drive import Loop, adrive, drive
from .context import FrozenContext
from .errors import StepError
from .result import RunError, RunResult

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = ["RunSpec", "aexecute_run", "execute_run", "failed_run", "steps_set_up", "worker_died"]


@dataclass(frozen=True, order=True)
class RunSpec:
    """One cell of the run grid."""

    replicate: int
    condition: str

    def label(self, experiment_name: str | None = None) -> str:
        """A readable name, e.g. ``crystallize:my_exp r=3 baseline``."""
        return f"crystallize:{experiment_name or 'experiment'} r={self.replicate} {self.condition}"


def execute_run(experiment: Experiment, replicate: int, condition: str) -> RunResult:
    """Run one replicate of one condition synchronously; never raises for run failures."""
    return drive(_run(experiment, replicate, condition))


async def aexecute_run(experiment: Experiment, replicate: int, condition: str) -> RunResult:
    """Like :func:`execute_run`, awaiting async work in the running event loop."""
    return await adrive(_run(experiment, replicate, condition))


def _run(experiment: Experiment, replicate: int, condition: str) -> Loop:
    started = time.perf_counter()
    ctx = experiment.new_context(replicate, condition)
    error: RunError | None = None
    where = "treatment"
    try:
        treatment = experiment.treatment_for(condition)
        if treatment is not None:
            treatment.apply(ctx)
        ctx._overridable = frozenset()
        for plugin in experiment.plugins:
            where = f"plugin {type(plugin).__name__}.before_replicate"
            plugin.before_replicate(experiment, ctx)
        where = "datasource"
        data = experiment.datasource(ctx)
        if inspect.isawaitable(data):
            data = yield data
        where = "pipeline"
        yield from experiment.pipeline._loop(data, ctx, experiment.cache)
    except StepError as exc:
        error = _error(replicate, condition, exc.step, exc.__cause__ or exc)
    except Exception as exc:
        if where == "pipeline":  # raised before the step ran (e.g. a missing parameter)
            where = experiment.pipeline.steps[len(ctx.provenance)].name
        error = _error(replicate, condition, where, exc)
    for plugin in experiment.plugins:
        try:
            plugin.after_replicate(experiment, ctx)
        except Exception as exc:
            error = error or _error(replicate, condition, f"plugin {type(plugin).__name__}.after_replicate", exc)
    seed = ctx._peek("seed")
    return RunResult(
        replicate=replicate,
        condition=condition,
        metrics={name: list(values) for name, values in ctx.metrics.as_dict().items()},
        seed=seed if isinstance(seed, int) else None,
        provenance=list(ctx.provenance),
        artifacts=list(ctx.artifacts),
        error=error,
        seconds=time.perf_counter() - started,
    )


def _error(replicate: int, condition: str, where: str, exc: BaseException) -> RunError:
    return RunError(
        replicate=replicate,
        condition=condition,
        step=where,
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


def failed_run(spec: RunSpec, where: str, type_name: str, message: str, *, traceback: str = "",
               attempts: int = 1) -> RunResult:
    """The RunResult of a run that failed outside the run itself (e.g. its worker)."""
    return RunResult(
        replicate=spec.replicate,
        condition=spec.condition,
        error=RunError(spec.replicate, spec.condition, where, type_name, message, traceback),
        attempts=attempts,
    )


def worker_died(spec: RunSpec, attempts: int, detail: str) -> RunResult:
    """The RunResult of a run whose worker process kept dying."""
    return failed_run(
        spec, "worker", "WorkerCrashedError",
        f"The worker process running this run died on each of {attempts} attempt(s) "
        f"({detail}); the other runs finished. Run it under SerialExecution to see the "
        f"crash, or check memory limits.",
        attempts=attempts,
    )


@contextmanager
def steps_set_up(experiment: Experiment) -> Iterator[None]:
    """Call ``setup(ctx)`` of every step, then ``teardown(ctx)`` on the way out."""
    ctx = FrozenContext(experiment.initial_ctx)
    done: list[Any] = []
    try:
        for step in experiment.pipeline.steps:
            step.setup(ctx)
            done.append(step)
        yield
    finally:
        for step in reversed(done):
            step.teardown(ctx)
