"""Executing one run: a pure function of (experiment, replicate, condition) -> RunResult.

Every backend calls :func:`execute_run` (or :func:`aexecute_run`), or the ``run``
method of :func:`steps_set_up`'s host, wherever it runs work; nothing a run does
escapes except through the RunResult it returns. A failure anywhere in the run,
``sys.exit()`` and other ``BaseException`` included, is caught and becomes the
RunResult's ``error``; only Ctrl-C (``KeyboardInterrupt``) stops the experiment.

The runner knows an experiment only through :class:`RunnableExperiment`, the few
things a run needs, so it depends on neither the experiment nor the plugins module.
"""

from __future__ import annotations

import inspect
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ._drive import Loop, adrive, drive, is_interrupt
from .context import FrozenContext
from .errors import ParameterError, StepError, WorkerCrashedError
from .invokers import StepInvoker
from .pipeline import Pipeline
from .result import RunError, RunResult
from .stores import CacheStore
from .treatments import Treatment

__all__ = [
    "ReplicateHooks",
    "RunSpec",
    "RunnableExperiment",
    "SetUpSteps",
    "aexecute_run",
    "execute_run",
    "failed_run",
    "steps_set_up",
    "worker_died",
]

log = logging.getLogger("crystallize.runner")
# The logger steps reach through ctx.logger (FrozenContext's default), looked up once.
_STEP_LOG = logging.getLogger("crystallize")
# What a data source returns most often; none of these can be awaited.
_NEVER_AWAITABLE = frozenset({tuple, list, dict, str, bytes, int, float, bool, type(None)})


class ReplicateHooks(Protocol):
    """The plugin hooks that run inside each run (see ``crystallize.plugins``)."""

    def before_replicate(self, experiment: Any, ctx: FrozenContext) -> None: ...

    def after_replicate(self, experiment: Any, ctx: FrozenContext) -> None: ...


class RunnableExperiment(Protocol):
    """What one run needs of an experiment; :class:`~crystallize.Experiment` is one."""

    name: str
    initial_ctx: Mapping[str, Any]
    pipeline: Pipeline
    datasource: Callable[[FrozenContext], Any]
    plugins: Sequence[Any]
    cache: CacheStore | bool | None

    def treatment_for(self, condition: str) -> Treatment | None: ...


@dataclass(frozen=True, order=True)
class RunSpec:
    """One cell of the run grid.

    Example:
        >>> RunSpec(3, "baseline").label("sweep")
        'crystallize:sweep r=3 baseline'
    """

    replicate: int
    condition: str

    def label(self, experiment_name: str | None = None) -> str:
        """A readable name, e.g. ``crystallize:my_exp r=3 baseline``."""
        return f"crystallize:{experiment_name or 'experiment'} r={self.replicate} {self.condition}"


def execute_run(
    experiment: RunnableExperiment,
    replicate: int,
    condition: str,
    *,
    invokers: Mapping[int, StepInvoker] | None = None,
) -> RunResult:
    """Run one replicate of one condition synchronously; never raises for run failures.

    Args:
        invokers: step index -> the invoker that calls that step where the backend
            hosts it (see :mod:`crystallize.invokers`).

    Raises:
        KeyboardInterrupt: only Ctrl-C escapes; every other failure is recorded.
    """
    return drive(_run(experiment, replicate, condition, invokers))


async def aexecute_run(
    experiment: RunnableExperiment,
    replicate: int,
    condition: str,
    *,
    invokers: Mapping[int, StepInvoker] | None = None,
) -> RunResult:
    """Like :func:`execute_run`, awaiting async work in the running event loop."""
    return await adrive(_run(experiment, replicate, condition, invokers))


def _run(
    experiment: RunnableExperiment, replicate: int, condition: str, invokers: Mapping[int, StepInvoker] | None = None
) -> Loop:
    started = time.perf_counter()
    ctx = FrozenContext.for_run(experiment.initial_ctx, replicate=replicate, condition=condition, logger=_STEP_LOG)
    error: RunError | None = None
    where = "treatment"
    hook = None  # the plugin whose before_replicate runs, named only if it fails
    try:
        treatment = experiment.treatment_for(condition)
        if treatment is not None:
            treatment.apply(ctx)
        ctx.seal_overrides()
        where = "before_replicate"
        for hook in experiment.plugins:
            hook.before_replicate(experiment, ctx)
        where = "datasource"
        data = experiment.datasource(ctx)
        if type(data) not in _NEVER_AWAITABLE and inspect.isawaitable(data):
            data = yield data
        where = "pipeline"
        yield from experiment.pipeline.loop(data, ctx, experiment.cache, invokers=invokers)
    except StepError as exc:
        error = _error(replicate, condition, exc.step, exc.__cause__ or exc)
    except ParameterError as exc:
        # In the pipeline the step that could not be filled names itself.
        step = exc.step if where == "pipeline" and exc.step else _where(where, hook)
        error = _error(replicate, condition, step, exc)
    except BaseException as exc:
        if is_interrupt(exc):
            raise
        error = _error(replicate, condition, _where(where, hook), exc)
    for plugin in experiment.plugins:
        try:
            plugin.after_replicate(experiment, ctx)
        except BaseException as exc:
            if is_interrupt(exc):
                raise
            error = error or _error(replicate, condition, f"plugin {type(plugin).__name__}.after_replicate", exc)
    seed = ctx.peek("seed")
    return RunResult(
        replicate=replicate,
        condition=condition,
        metrics={name: list(values) for name, values in ctx.metrics.as_dict().items()},
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        provenance=list(ctx.provenance),
        artifacts=list(ctx.artifacts),
        error=error,
        seconds=time.perf_counter() - started,
    )


def _where(stage: str, plugin: Any) -> str:
    """Where a run failed, as RunError.step says it."""
    return f"plugin {type(plugin).__name__}.before_replicate" if stage == "before_replicate" else stage


def _error(replicate: int, condition: str, where: str, exc: BaseException) -> RunError:
    return RunError(
        replicate=replicate,
        condition=condition,
        step=where,
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


def failed_run(
    spec: RunSpec, where: str, type_name: str, message: str, *, traceback: str = "", attempts: int = 1
) -> RunResult:
    """The RunResult of a run that failed outside the run itself (e.g. its worker).

    Example:
        >>> failed_run(RunSpec(0, "baseline"), "worker", "OSError", "gone").error.step
        'worker'
    """
    return RunResult(
        replicate=spec.replicate,
        condition=spec.condition,
        error=RunError(spec.replicate, spec.condition, where, type_name, message, traceback),
        attempts=attempts,
    )


def worker_died(spec: RunSpec, attempts: int, detail: str) -> RunResult:
    """The RunResult of a run whose worker process kept dying (a WorkerCrashedError)."""
    return failed_run(
        spec,
        "worker",
        WorkerCrashedError.__name__,
        f"The worker process running this run died on each of {attempts} attempt(s) "
        f"({detail}); the other runs finished. Run it under SerialExecution to see the "
        f"crash, or check memory limits.",
        attempts=attempts,
    )


class SetUpSteps:
    """The steps of one experiment, set up in this process; runs go through it.

    A step whose ``setup()`` raised does not stop the experiment: every run that
    needs the step (all of them) is recorded as failed at ``<Step>.setup``, naming
    the exception, on every backend alike; ``run()`` then returns with those errors.

    Steps the backend hosts elsewhere (the indexes in ``invokers``) are neither set up
    nor torn down here: where they live does that.

    Attributes:
        error: the failure of the first ``setup()`` that raised, or ``None``.
        invokers: step index -> invoker, for the steps hosted elsewhere.
    """

    def __init__(self, experiment: RunnableExperiment, invokers: Mapping[int, StepInvoker] | None = None) -> None:
        self.experiment = experiment
        self.invokers: dict[int, StepInvoker] = dict(invokers or {})
        self.error: tuple[str, BaseException] | None = None
        self._done: list[Any] = []
        self._ctx = FrozenContext(experiment.initial_ctx)

    def set_up(self) -> None:
        """Call each step's ``setup(ctx)`` in order, stopping at the first failure.

        Runs at every ``Experiment.run()`` in each process hosting steps, so it is
        also where the steps read their code fingerprints afresh (a module constant
        rebound between two runs is a miss, not a stale hit).
        """
        self.experiment.pipeline.forget_cache_identities()
        for index, step in enumerate(self.experiment.pipeline.steps):
            if index in self.invokers:
                continue  # set up where it is hosted
            try:
                step.setup(self._ctx)
            except BaseException as exc:
                if is_interrupt(exc):
                    raise
                log.error(
                    "Step %r: setup() raised %s: %s; every run that needs it is recorded as failed.",
                    step.name,
                    type(exc).__name__,
                    exc,
                )
                self.error = (f"{step.name}.setup", exc)
                return
            self._done.append(step)

    def tear_down(self) -> None:
        """Call ``teardown(ctx)`` of every step set up, in reverse; errors are logged."""
        while self._done:
            step = self._done.pop()
            try:
                step.teardown(self._ctx)
            except BaseException as exc:  # sys.exit() in a teardown must not escape run()
                if is_interrupt(exc):
                    raise
                log.error("Step %r: teardown() raised; the results are unaffected.", step.name, exc_info=exc)

    def run(self, replicate: int, condition: str) -> RunResult:
        """:func:`execute_run`, or the set-up failure recorded on this run."""
        if self.error is not None:
            return self._failed(replicate, condition)
        return execute_run(self.experiment, replicate, condition, invokers=self.invokers)

    async def arun(self, replicate: int, condition: str) -> RunResult:
        """:func:`aexecute_run`, or the set-up failure recorded on this run."""
        if self.error is not None:
            return self._failed(replicate, condition)
        return await aexecute_run(self.experiment, replicate, condition, invokers=self.invokers)

    def _failed(self, replicate: int, condition: str) -> RunResult:
        where, exc = self.error  # type: ignore[misc]
        run = RunResult(replicate=replicate, condition=condition, error=_error(replicate, condition, where, exc))
        return run


@contextmanager
def steps_set_up(
    experiment: RunnableExperiment, invokers: Mapping[int, StepInvoker] | None = None
) -> Iterator[SetUpSteps]:
    """Set every step up (``setup(ctx)``), yield the host, tear them down on the way out.

    ``invokers`` (step index -> invoker) names the steps the backend hosts elsewhere:
    they are not set up here, and their calls go to their invoker.

    Example:
        >>> from crystallize import Experiment, pipeline_step
        >>> @pipeline_step()
        ... def double(data):
        ...     return data, {"x": data * 2}
        >>> exp = Experiment(datasource=lambda ctx: 2, pipeline=[double()])
        >>> with steps_set_up(exp) as host:
        ...     host.run(0, "baseline").metrics
        {'x': [4]}
    """
    host = SetUpSteps(experiment, invokers)
    try:
        host.set_up()
        yield host
    finally:
        host.tear_down()
