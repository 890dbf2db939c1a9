"""The backend kit: everything an execution backend is written against.

A backend decides *where* runs execute. ``Experiment.run()`` hands it the experiment
(prepared for this call) and the plan, a list of :class:`RunSpec`; the backend yields
exactly one :class:`RunResult` per spec, in any order, and the driver checks that.
A backend never needs to know what a step does. ``crystallize_ray`` is written
against this module and ``crystallize`` alone; so can yours be.

The pieces, in the order a backend uses them::

    ExecutionBackend          subclass it; implement execute() (and aexecute() if
                              runs belong in the caller's event loop); declare
                              capabilities with class flags; validate options in
                              __init__ with check_option() -> ConfigurationError
    serialize_experiment()    once per run(), in the driver, before any work is
                              submitted: fails with SerializationError naming the
                              part that cannot be pickled
    deserialize_experiment()  once per worker process
    steps_set_up()            once per process that hosts steps: setup() / teardown()
      host.run(r, c)          one run -> RunResult; never raises but for Ctrl-C
    batched()                 group specs into tasks
    pack_results()            results -> bytes in a worker (a result that cannot be
    unpack_results()          pickled fails only its own run) -> results in the driver
    failed_run(), worker_died(), timed_out()
                              records for runs that failed outside the run itself
    running_step()            which step a run is in now and on which line, for a
                              backend that stops runs that exceed ``timeout=``

Hosting a step elsewhere (crystallize_ray keeps heavy steps in actor pools), see
:mod:`crystallize.invokers`::

    serialize_step()          in the driver: one step as its recipe, user code by value
    deserialize_step()        where it lives: build it, then call its setup() once
    host_steps()              in the driver: the experiment to ship, those steps as
                              stand-ins that carry their name and cache identity
    steps_set_up(job, invokers={index: invoker})
                              in the run's process: the step's calls go to its
                              invoker; the cache is looked up first, here
    call_step(), acall_step() where it lives: one call from a StepCall, its
                              StepEffects recorded for the run to replay
    default_cache_store()     resolve the default store in the driver, before
                              shipping (workers may run in another directory)

Example:
    A backend that runs each run twice and keeps the second result:

    >>> from crystallize import Experiment, pipeline_step
    >>> from crystallize.backend import ExecutionBackend, steps_set_up
    >>> class Twice(ExecutionBackend):
    ...     def execute(self, experiment, plan):
    ...         with steps_set_up(experiment) as host:
    ...             for spec in plan:
    ...                 host.run(spec.replicate, spec.condition)
    ...                 yield host.run(spec.replicate, spec.condition)
    >>> @pipeline_step()
    ... def one(data):
    ...     return data, {"x": 1}
    >>> Experiment(lambda ctx: 0, [one()], plugins=[Twice()]).run(replicates=3).metrics.baseline.metrics
    {'x': [1, 1, 1]}
"""

from __future__ import annotations

import abc
import asyncio
import math
import sys
import threading
import traceback
import types
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from ._drive import is_interrupt
from .context import active_context
from .errors import ConfigurationError, WorkerCrashedError
from .fingerprint import _is_user_file
from .invokers import (
    StepCall,
    StepEffects,
    StepInvoker,
    acall_step,
    call_step,
    host_steps,
)
from .plugins import BasePlugin
from .result import RunResult
from .runner import (
    RunnableExperiment,
    RunSpec,
    SetUpSteps,
    aexecute_run,
    execute_run,
    failed_run,
    steps_set_up,
    worker_died,
)
from .serialization import (
    deserialize_experiment,
    deserialize_step,
    pack_results,
    serialize_experiment,
    serialize_step,
    unpack_results,
)
from .signing import CacheKeyError, cache_key
from .stores import KeyedStore, default_cache_store

__all__ = [
    "GRACE_SECONDS",
    "WAIT_SLICE_SECONDS",
    "ConfigurationError",
    "ExecutionBackend",
    "RunResult",
    "RunSpec",
    "RunnableExperiment",
    "SetUpSteps",
    "StepCall",
    "StepEffects",
    "StepInvoker",
    "WorkerCrashedError",
    "acall_step",
    "aexecute_run",
    "batched",
    "call_step",
    "check_option",
    "default_cache_store",
    "deserialize_experiment",
    "deserialize_step",
    "execute_run",
    "failed_run",
    "host_steps",
    "is_int",
    "is_interrupt",
    "is_seconds",
    "pack_results",
    "resolve_cache",
    "running_step",
    "serialize_experiment",
    "serialize_step",
    "steps_set_up",
    "timed_out",
    "unpack_results",
    "worker_died",
]


#: On Ctrl-C, how long runs already in flight may still come back and be kept.
GRACE_SECONDS = 0.5
#: The longest a driver thread should block at once. Python runs signal handlers in
#: the main thread only, when it wakes up; this bounds how late Ctrl-C is noticed.
WAIT_SLICE_SECONDS = 0.2


class ExecutionBackend(BasePlugin, abc.ABC):
    """Where an experiment's runs execute; give one in ``Experiment(plugins=[...])``.

    Subclasses implement :meth:`execute`. The experiment asks the class flags below
    instead of checking types, so a new backend states what it can do.

    Attributes:
        progress: whether the driver shows a progress line over runs.
        async_native: runs execute as coroutines in the caller's event loop
            (:meth:`aexecute` is the real implementation). A synchronous ``run()``
            inside a running event loop is then refused with a pointer to ``arun()``.
        ships_experiment: runs execute in other processes, so the experiment is
            pickled (and must be picklable) and plugins' replicate hooks run on copies.
        supports_timeout: the backend takes ``timeout=`` (seconds per run) and stops a
            run that exceeds it, recording it with :func:`timed_out`. A backend that
            cannot stop a run raises ``ConfigurationError`` for ``timeout=`` instead,
            saying which backend can.
    """

    progress: bool = False
    async_native: bool = False
    ships_experiment: bool = False
    supports_timeout: bool = False

    @abc.abstractmethod
    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        """Yield one RunResult per spec in ``plan``, in any order.

        Args:
            experiment: the experiment prepared for this ``run()`` (a
                :class:`RunnableExperiment`).
            plan: the runs to execute.

        Ctrl-C: a ``KeyboardInterrupt`` may be raised inside ``execute`` (the main
        thread woke up in a wait: block at most :data:`WAIT_SLICE_SECONDS` at a time) or
        thrown in at its ``yield`` (the driver was handling a result). Either way:
        start no new run, yield the runs that finish within :data:`GRACE_SECONDS`, stop
        the workers you own (even if a second Ctrl-C arrives meanwhile; never wait
        without a timeout), then re-raise. The driver attaches every run it received to
        the exception as ``partial_result``.

        Raises:
            KeyboardInterrupt: on Ctrl-C, after the steps above.
        """

    async def aexecute(self, experiment: Any, plan: Sequence[RunSpec]) -> AsyncIterator[RunResult]:
        """Async form of :meth:`execute`; by default runs ``execute`` in a helper thread.

        Results stream into the event loop as they finish; the loop is never blocked.
        When the caller is cancelled (``asyncio.run`` turns Ctrl-C into cancelling
        its main task) or interrupted, the results that arrive within half a second
        are yielded before the exception propagates; then the helper thread is told
        to stop: it closes ``execute``'s generator, so the backend stops its workers,
        as soon as the backend hands it its next result. It is a daemon thread, so it
        never holds up the interpreter's exit.
        """
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        done = object()
        stop = threading.Event()

        def post(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        def pump() -> None:
            runs = self.execute(experiment, plan)
            try:
                for run in runs:
                    if stop.is_set():
                        break
                    post(run)
            except BaseException as exc:  # re-raised in the event loop below
                post(exc)
            finally:
                try:
                    close = getattr(runs, "close", None)
                    if close is not None:
                        close()
                except BaseException as exc:
                    post(exc)
                post(done)

        thread = threading.Thread(target=pump, name=f"crystallize-{type(self).__name__}", daemon=True)
        thread.start()
        try:
            while (item := await inbox.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        except (asyncio.CancelledError, KeyboardInterrupt):
            grace = loop.time() + 0.5  # the runs that come back meanwhile are kept
            while (left := grace - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(inbox.get(), left)
                except TimeoutError:
                    break
                if item is done:
                    break
                if isinstance(item, RunResult):
                    yield item
            raise
        finally:
            stop.set()
        thread.join()


def check_option(owner: str, option: str, value: Any, test: Callable[[Any], bool], expected: str) -> None:
    """Validate one constructor option; call it in a backend's ``__init__``.

    Raises:
        ConfigurationError: (a ``ValueError``) naming ``owner``, ``option``, the value
            given and what was expected.

    Example:
        >>> check_option("MyBackend", "batch_size", -1, lambda v: v is None or v >= 1,
        ...              "None or an integer >= 1")
        Traceback (most recent call last):
        ...
        crystallize.errors.ConfigurationError: MyBackend(batch_size=-1): batch_size must be None or an integer >= 1.
    """
    try:
        ok = bool(test(value))
    except Exception:
        ok = False
    if not ok:
        raise ConfigurationError(owner, option, value, expected)


def is_int(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an ``int`` (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_seconds(value: Any) -> bool:
    """Whether ``value`` is a finite number of seconds above zero (not a bool).

    Example:
        >>> is_seconds(2.5), is_seconds(0), is_seconds(True), is_seconds(float("inf"))
        (True, False, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def timed_out(
    spec: RunSpec,
    seconds: float,
    step: str,
    line: str = "",
    stack: str = "",
    stopped: str = "its worker was stopped and replaced",
) -> RunResult:
    """The record of a run stopped because it ran past ``timeout=`` seconds.

    Its error is a ``TimeoutError`` at ``step`` (``result.errors`` names it like any
    failure); a timed-out run is not retried.

    Args:
        spec: the run.
        seconds: the timeout it exceeded.
        step: the step it was in, as :func:`running_step` names it.
        line: ``"file:line in function"`` where it was, when known.
        stack: the stack it was stopped in, as text (the error's traceback).
        stopped: what became of the run, for the message.

    Example:
        >>> run = timed_out(RunSpec(3, "baseline"), 5, "train", "train.py:12 in train")
        >>> run.error.step, run.error.type
        ('train', 'TimeoutError')
        >>> print(run.error.message)  # doctest: +ELLIPSIS
        The run exceeded its 5 s timeout in step 'train', at train.py:12 in train; ...
    """
    at = f", at {line}" if line else ""
    return failed_run(
        spec,
        step,
        "TimeoutError",
        f"The run exceeded its {seconds:g} s timeout in step {step!r}{at}; {stopped}, and "
        f"the other runs went on. If the step needs longer, raise timeout=; otherwise see "
        f"that line for what it waits on.",
        traceback=stack
        or f"TimeoutError: no stack could be read (the worker did not answer "
        f"within a second, e.g. inside native code){at}.\n",
    )


def running_step(experiment: Any, frame: Any = None, ctx: Any = None) -> tuple[str, str, str]:
    """Which part of its run a thread is executing now, for a backend enforcing ``timeout=``.

    Call it in the run's own thread (e.g. in a signal handler, passing the frame the
    handler got), or from outside with the run's context and frames (an asyncio
    task's chain of awaiting coroutines).

    Args:
        experiment: the experiment the run belongs to.
        frame: the run's innermost Python frame, or a list of its frames from the
            outermost to the innermost; ``None`` for the caller's.
        ctx: the run's context; ``None`` reads the active one in this thread or task.

    Returns:
        ``(step, line, stack)``: the step's name, or ``"datasource"``, ``"treatment"``,
        ``"plugin <Name>.<hook>"``, or ``"run"`` when it cannot tell; ``"file:line in
        function"`` of the innermost frame; and the stack as text.

    Example:
        >>> from crystallize import Experiment, pipeline_step
        >>> @pipeline_step()
        ... def probe(data, ctx):
        ...     return data, {"at": running_step(exp)[0]}
        >>> exp = Experiment(lambda ctx: 0, [probe()])
        >>> exp.run().metrics.baseline.metrics
        {'at': ['probe']}
    """
    if isinstance(frame, (list, tuple)):
        frames = list(frame)
    else:
        frames = []
        outer = frame if frame is not None else sys._getframe(1)
        while outer is not None and len(frames) < 200:
            frames.append(outer)
            outer = outer.f_back
        frames.reverse()
    ctx = ctx if ctx is not None else active_context()
    step = None
    steps = getattr(getattr(experiment, "pipeline", None), "steps", ())
    if ctx is not None and len(getattr(ctx, "provenance", ())) < len(steps):
        step = steps[len(ctx.provenance)].name  # the pipeline is inside this step
    if step is None:  # outside the step loop: the data source, the treatment or a hook?
        labels = _code_labels(experiment)
        step = next((labels[f.f_code] for f in reversed(frames) if f.f_code in labels), None)
    if not frames:
        return step or "run", "", ""
    # The line to show is the user's (a step waiting in asyncio.sleep is at its await).
    at = next((f for f in reversed(frames) if _is_user_file(f.f_code.co_filename)), frames[-1])
    code, lineno = at.f_code, at.f_lineno
    # The stack from the user's outermost frame on: the framework's frames above it are noise.
    first = next((i for i, f in enumerate(frames) if _is_user_file(f.f_code.co_filename)), 0)
    stack = traceback.StackSummary.extract(((f, f.f_lineno) for f in frames[first:][-20:]), lookup_lines=True)
    return step or "run", f"{code.co_filename}:{lineno} in {code.co_name}", "".join(stack.format())


def _code_labels(experiment: Any) -> dict[types.CodeType, str]:
    """The code objects of a run's parts outside the step loop, each with its RunError.step."""
    labels: dict[types.CodeType, str] = {}

    def add(fn: Any, label: str) -> None:
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)
        if code is not None:
            labels.setdefault(code, label)

    source = getattr(experiment, "datasource", None)
    kind = type(source)
    for fn in (getattr(source, "fn", None), source, getattr(kind, "fetch", None), vars(kind).get("__call__")):
        add(fn, "datasource")
    for treatment in getattr(experiment, "treatments", ()):
        add(type(treatment).apply, "treatment")
    for plugin in getattr(experiment, "plugins", ()):
        for hook in ("before_replicate", "after_replicate"):
            add(getattr(type(plugin), hook, None), f"plugin {type(plugin).__name__}.{hook}")
    return labels


def batched(plan: Sequence[RunSpec], size: int) -> list[list[RunSpec]]:
    """Split ``plan`` into consecutive batches of at most ``size`` runs.

    Example:
        >>> [len(b) for b in batched([RunSpec(r, "baseline") for r in range(5)], 2)]
        [2, 2, 1]
    """
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [list(plan[i : i + size]) for i in range(0, len(plan), size)]


def resolve_cache(experiment: Any) -> Any:
    """A shallow copy of ``experiment`` whose cache is resolved here, in the driver.

    Call it in the driver before shipping the experiment to other machines:

    * ``cache=None`` (or ``True``) means ``./.cache`` of the driver's working
      directory, which a worker elsewhere would resolve differently;
    * the store is wrapped in a :class:`~crystallize.stores.KeyedStore` holding the
      driver's cache key, so workers sign and verify entries with it rather than
      with their own machine's per-user key. The key travels inside the shipped
      experiment. If the driver has no key (its key file cannot be read or made),
      the store ships unkeyed and each worker uses its own.

    Args:
        experiment: the experiment prepared for this ``run()``.

    Returns:
        The copy to ship; ``experiment`` itself is not changed.

    Example:
        >>> job = resolve_cache(experiment)  # doctest: +SKIP
        >>> blob = serialize_experiment(job, backend="MyCluster")  # doctest: +SKIP
    """
    import copy

    job = copy.copy(experiment)
    if job.cache is None or job.cache is True:
        job.cache = default_cache_store()
    caching = job.cache is not False and any(step.cacheable for step in job.pipeline.steps)
    if caching and not isinstance(job.cache, KeyedStore):
        try:
            job.cache = KeyedStore(job.cache, cache_key())
        except CacheKeyError:
            pass  # each worker resolves its own key, and warns once if it cannot
    return job
