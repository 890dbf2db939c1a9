"""Pipeline: an ordered list of steps run over one piece of data and one context.

The step loop is written once, as a generator that yields each awaitable a step
returns (see ``_drive.py``): ``run`` and ``arun`` share every rule about caching,
metrics and provenance.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ._drive import Loop, adrive, drive, is_interrupt, loop_error, loop_running
from .cache import StepCache, value_digest
from .context import _ACTIVE, FrozenContext, _StepRecorder
from .errors import ParameterError, PipelineError, StepError
from .invokers import StepInvoker, replay_effects, step_call
from .provenance import CacheStatus, StepRecord
from .step_cache import (
    Keys,
    cache_key,
    capture_generators,
    consumed_generators,
    lookup,
    replay_step,
    store_entry,
)
from .steps import FunctionStep, PipelineStep, is_step_factory
from .stores import CacheStore, default_cache_store, open_store

__all__ = ["Pipeline"]


class Pipeline:
    """An ordered sequence of steps.

    Each entry may be a :class:`PipelineStep` instance, a ``@pipeline_step`` factory
    (called with no arguments) or a ``functools.partial`` of one.

    Args:
        steps: the entries, in order; at least one.

    Raises:
        PipelineError: the list is empty or an entry is not a step.

    Example:
        >>> from crystallize import pipeline_step
        >>> @pipeline_step()
        ... def double(data):
        ...     return data * 2
        >>> Pipeline([double, double()]).run(3)
        12
    """

    def __init__(self, steps: Iterable[Any]) -> None:
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
            raise PipelineError(
                f"Pipeline takes a list of steps, got {type(steps).__name__}: Pipeline([step_a(), step_b()])."
            )
        self.steps: tuple[PipelineStep, ...] = tuple(_as_step(entry, index) for index, entry in enumerate(steps))
        if not self.steps:
            raise PipelineError("A Pipeline needs at least one step, e.g. Pipeline([my_step()]).")

    @property
    def is_async(self) -> bool:
        """Whether any step is an async function."""
        return any(step.is_async() for step in self.steps)

    def run(self, data: Any, ctx: FrozenContext | None = None, *, cache: CacheStore | str | bool | None = None) -> Any:
        """Run every step over ``data`` and return the last step's output.

        Async steps are awaited on a private event loop. Inside a running event loop
        (a notebook, an ``async def``) use ``await pipeline.arun(...)`` instead when the
        pipeline has async steps.

        Args:
            data: the first step's input.
            ctx: the run's context; a new empty one if omitted.
            cache: the store for cacheable steps: a store, a URL (``"s3://bucket/prefix"``)
                or a directory; ``None`` or ``True`` for the default
                (``$CRYSTALLIZE_CACHE_URL``, ``$CRYSTALLIZE_CACHE_DIR`` or ``./.cache``),
                ``False`` for no caching.

        Raises:
            StepError: a step raised (its exception is ``__cause__``).
            MissingParameterError: a step parameter could not be filled.
            PipelineError: called inside a running event loop with async steps.
        """
        if self.is_async and loop_running():
            raise loop_error()
        self.forget_cache_identities()
        return drive(self.loop(data, _context(ctx), cache))

    async def arun(
        self, data: Any, ctx: FrozenContext | None = None, *, cache: CacheStore | str | bool | None = None
    ) -> Any:
        """Like :meth:`run`, awaiting async steps in the running event loop."""
        self.forget_cache_identities()
        return await adrive(self.loop(data, _context(ctx), cache))

    def forget_cache_identities(self) -> None:
        """Make each step read its code fingerprint and constructor arguments again.

        A step remembers them between runs (fingerprinting is not free); :meth:`run`,
        :meth:`arun` and every ``Experiment.run()`` call this first, so a helper's
        module constant rebound between two runs in one process is a miss, not a
        stale hit. Call it yourself before driving :meth:`loop` for a new batch of
        runs.
        """
        for step in self.steps:
            step.forget_cache_identity()

    # -- the one step loop ----------------------------------------------------
    def loop(
        self,
        data: Any,
        ctx: FrozenContext,
        cache: CacheStore | str | bool | None = None,
        *,
        invokers: Mapping[int, StepInvoker] | None = None,
    ) -> Loop:
        """The step loop as a generator that yields each awaitable a step returns.

        :meth:`run` and :meth:`arun` drive it; a runner drives it inside a larger
        generator (``yield from pipeline.loop(...)``) so one run is written once for
        sync and async execution. The generator's return value is the last output.
        ``invokers`` maps a step's index to the invoker that calls it where a backend
        hosts it (see :mod:`crystallize.invokers`); the cache is looked up here first.

        Raises:
            StepError: a step raised (the step's exception is ``__cause__``).
            ParameterError: a step's parameters could not be filled; ``exc.step``
                names the step.
        """
        step_cache = None
        if cache is not False and any(step.cacheable for step in self.steps):
            store = default_cache_store() if cache is None or cache is True else open_store(cache)
            step_cache = StepCache(store)
        token = _ACTIVE.set(ctx)
        try:
            for index, step in enumerate(self.steps):
                invoker = invokers.get(index) if invokers else None
                data = yield from _run_step(index, step, data, ctx, step_cache, invoker)
        finally:
            try:
                _ACTIVE.reset(token)
            except ValueError:  # closed from another context (garbage collection)
                pass
        return data

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(s) for s in self.steps)}])"


def _run_step(
    index: int,
    step: PipelineStep,
    data: Any,
    ctx: FrozenContext,
    cache: StepCache | None,
    invoker: StepInvoker | None = None,
) -> Loop:
    """Run one step: resolve parameters, look the cache up, call (or invoke), record provenance."""
    started = time.perf_counter()
    served_by = None
    flight = None
    caching = step.cacheable and cache is not None
    # A cacheable step's reads are digested as they happen (see _StepRecorder).
    recorder = _StepRecorder(value_digest if caching else None)
    ctx._recorder = recorder
    try:
        try:
            params = step.resolve_params(ctx)
        except ParameterError as exc:
            if exc.step is None:
                exc.step = step.name
            raise
        keys = cache_key(step, params, data) if caching else None
        status: CacheStatus = "off" if not caching else ("skipped" if keys is None else "miss")
        miss, generators = None, None
        if keys is not None:
            cache.failed = False  # type: ignore[union-attr]  # this step's store errors only
            entry, miss = lookup(cache, keys, ctx, step, index)  # type: ignore[arg-type]
            if entry is None:  # single flight: wait while another run computes this entry
                flight = yield from cache.single_flight(keys.step_hash, keys.input_hash, ctx)  # type: ignore[union-attr]
                if flight.entry is not None:
                    entry, miss = flight.entry, None
                    replay_step(entry, ctx, step, index)
            if entry is not None:
                _record(
                    ctx,
                    step,
                    index,
                    params,
                    keys,
                    "hit",
                    tuple(entry.reads),
                    recorder,
                    started,
                    waited=flight.waited if flight is not None else 0.0,
                )
                return entry.output
            # What the step may draw from, as it finds it (see crystallize.randomness).
            generators = capture_generators(step, ctx)
        try:
            if invoker is None:
                output = _invoke(step, data, ctx, params)
                if inspect.isawaitable(output):
                    output = yield output
            else:  # hosted elsewhere: its effects come back and are applied here
                call = step_call(ctx, params)
                effects = invoker(step, data, call)
                if inspect.isawaitable(effects):
                    effects = yield effects
                output = replay_effects(effects, call, ctx)
                served_by = effects.served_by
        except BaseException as exc:
            if is_interrupt(exc):
                raise
            raise StepError(step.name, index, exc) from exc
        moved = consumed_generators(step, generators) if keys is not None else None
        output = _split_metrics(output, ctx)
        if keys is not None:
            status = "skipped"
            if moved is not None:
                status = store_entry(cache, step, keys, output, recorder, moved, miss)  # type: ignore[arg-type]
            if cache.failed:  # type: ignore[union-attr]  # warned once by the store; the run stands
                status = "error"
        _record(
            ctx,
            step,
            index,
            params,
            keys,
            status,
            tuple(recorder.reads),
            recorder,
            started,
            miss.reason if miss else None,
            waited=flight.waited if flight is not None else 0.0,
            served_by=served_by,
        )
        return output
    finally:
        ctx._recorder = None
        if flight is not None:  # stored, or failed: either way the waiting runs may go on
            flight.release()


def _invoke(step: PipelineStep, data: Any, ctx: FrozenContext, params: dict[str, Any]) -> Any:
    if isinstance(step, FunctionStep):
        return step.call_resolved(data, ctx, params)
    return step(data, ctx)


def _split_metrics(output: Any, ctx: FrozenContext) -> Any:
    """A ``(data, {name: value})`` return records the metrics and passes ``data`` on."""
    if type(output) is tuple and len(output) == 2 and isinstance(output[1], Mapping):
        data, metrics = output
        for name, value in metrics.items():
            ctx.metrics.add(name, value)
        return data
    return output


def _record(
    ctx: FrozenContext,
    step: PipelineStep,
    index: int,
    params: dict[str, Any],
    keys: Keys | None,
    status: CacheStatus,
    reads: tuple[str, ...],
    recorder: _StepRecorder,
    started: float,
    miss_reason: str | None = None,
    *,
    waited: float = 0.0,
    served_by: str | None = None,
) -> None:
    ctx.provenance.append(
        StepRecord(
            name=step.name,
            index=index,
            params=params,
            step_hash=keys.step_hash if keys else None,
            input_hash=keys.input_hash if keys else None,
            cache=status,
            reads=reads,
            added=tuple(k for k, _ in recorder.added),
            seconds=time.perf_counter() - started,
            miss_reason=miss_reason,
            waited=waited,
            served_by=served_by,
        )
    )


def _as_step(entry: Any, index: int) -> PipelineStep:
    if isinstance(entry, PipelineStep):
        return entry
    if is_step_factory(entry):
        built = entry()
        if isinstance(built, PipelineStep):
            return built
    if isinstance(entry, type) and issubclass(entry, PipelineStep):
        raise PipelineError(
            f"Pipeline entry {index} is the class {entry.__name__}; pass an instance, "
            f"e.g. Pipeline([{entry.__name__}()]), so heavy resources load once."
        )
    if callable(entry):
        name = getattr(entry, "__name__", type(entry).__name__)
        raise PipelineError(
            f"Pipeline entry {index} ({name!r}) is a plain callable, not a step. "
            f"Decorate the function with @pipeline_step() or subclass PipelineStep."
        )
    raise PipelineError(
        f"Pipeline entry {index} is a {type(entry).__name__} ({entry!r}), not a step. "
        f"Entries must be PipelineStep instances or @pipeline_step functions."
    )


def _context(ctx: FrozenContext | None) -> FrozenContext:
    if ctx is None:
        return FrozenContext()
    if not isinstance(ctx, FrozenContext):
        raise TypeError(f"ctx must be a FrozenContext, got {type(ctx).__name__}.")
    return ctx
