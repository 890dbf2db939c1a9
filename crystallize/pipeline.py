"""Pipeline: an ordered list of steps run over one piece of data and one context.

The step loop is written once, as a generator that yields each awaitable a step
returns (see ``_drive.py``): ``run`` and ``arun`` share every rule about caching,
metrics and provenance.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ._drive import Loop, adrive, drive, is_interrupt, loop_error, loop_running
from .cache import CacheEntry, StepCache, read_digests, value_digest
from .context import _ACTIVE, FrozenContext, _StepRecorder
from .errors import ParameterError, PipelineError, StepError
from .hashing import hash_struct, hash_value
from .provenance import CacheStatus, StepRecord
from .steps import FunctionStep, PipelineStep, is_step_factory
from .stores import CacheStore, default_cache_store

__all__ = ["Pipeline"]

log = logging.getLogger("crystallize.pipeline")


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
                f"Pipeline takes a list of steps, got {type(steps).__name__}: "
                f"Pipeline([step_a(), step_b()])."
            )
        self.steps: tuple[PipelineStep, ...] = tuple(
            _as_step(entry, index) for index, entry in enumerate(steps)
        )
        if not self.steps:
            raise PipelineError(
                "A Pipeline needs at least one step, e.g. Pipeline([my_step()])."
            )

    @property
    def is_async(self) -> bool:
        """Whether any step is an async function."""
        return any(step.is_async() for step in self.steps)

    def run(
        self, data: Any, ctx: FrozenContext | None = None, *, cache: CacheStore | bool | None = None
    ) -> Any:
        """Run every step over ``data`` and return the last step's output.

        Async steps are awaited on a private event loop. Inside a running event loop
        (a notebook, an ``async def``) use ``await pipeline.arun(...)`` instead when the
        pipeline has async steps.

        Args:
            data: the first step's input.
            ctx: the run's context; a new empty one if omitted.
            cache: the store for cacheable steps; ``None`` or ``True`` for the default
                (``$CRYSTALLIZE_CACHE_DIR`` or ``./.cache``), ``False`` for no caching.

        Raises:
            StepError: a step raised (its exception is ``__cause__``).
            MissingParameterError: a step parameter could not be filled.
            PipelineError: called inside a running event loop with async steps.
        """
        if self.is_async and loop_running():
            raise loop_error()
        return drive(self.loop(data, _context(ctx), cache))

    async def arun(
        self, data: Any, ctx: FrozenContext | None = None, *, cache: CacheStore | bool | None = None
    ) -> Any:
        """Like :meth:`run`, awaiting async steps in the running event loop."""
        return await adrive(self.loop(data, _context(ctx), cache))

    # -- the one step loop ----------------------------------------------------
    def loop(self, data: Any, ctx: FrozenContext, cache: CacheStore | bool | None = None) -> Loop:
        """The step loop as a generator that yields each awaitable a step returns.

        :meth:`run` and :meth:`arun` drive it; a runner drives it inside a larger
        generator (``yield from pipeline.loop(...)``) so one run is written once for
        sync and async execution. The generator's return value is the last output.

        Raises:
            StepError: a step raised (the step's exception is ``__cause__``).
            ParameterError: a step's parameters could not be filled; ``exc.step``
                names the step.
        """
        step_cache = None
        if cache is not False and any(step.cacheable for step in self.steps):
            store = default_cache_store() if cache is None or cache is True else cache
            step_cache = StepCache(store)
        token = _ACTIVE.set(ctx)
        try:
            for index, step in enumerate(self.steps):
                data = yield from _run_step(index, step, data, ctx, step_cache)
        finally:
            try:
                _ACTIVE.reset(token)
            except ValueError:  # closed from another context (garbage collection)
                pass
        return data

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(s) for s in self.steps)}])"


class _Keys:
    """A cacheable step's cache key for one call, or why it has none."""

    __slots__ = ("step_hash", "input_hash")

    def __init__(self, step_hash: str, input_hash: str) -> None:
        self.step_hash, self.input_hash = step_hash, input_hash


def _run_step(
    index: int, step: PipelineStep, data: Any, ctx: FrozenContext, cache: StepCache | None
) -> Loop:
    """Run one step: resolve parameters, look the cache up, call, record provenance."""
    started = time.perf_counter()
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
        keys = _cache_key(step, params, data) if caching else None
        status: CacheStatus = "off" if not caching else ("skipped" if keys is None else "miss")
        if keys is not None:
            cache.failed = False  # type: ignore[union-attr]  # this step's store errors only
            entry = _lookup(cache, keys, ctx, step, index)  # type: ignore[arg-type]
            if entry is not None:
                _record(ctx, step, index, params, keys, "hit", tuple(entry.reads), recorder, started)
                return entry.output
        try:
            output = _invoke(step, data, ctx, params)
            if inspect.isawaitable(output):
                output = yield output
        except BaseException as exc:
            if is_interrupt(exc):
                raise
            raise StepError(step.name, index, exc) from exc
        output = _split_metrics(output, ctx)
        if keys is not None:
            status = _store(cache, step, keys, output, recorder)  # type: ignore[arg-type]
            if cache.failed:  # type: ignore[union-attr]  # warned once by the store; the run stands
                status = "error"
        _record(ctx, step, index, params, keys, status, tuple(recorder.reads), recorder, started)
        return output
    finally:
        ctx._recorder = None


def _lookup(cache: StepCache, keys: _Keys, ctx: FrozenContext, step: PipelineStep, index: int) -> CacheEntry | None:
    """The entry for ``keys`` replayed into ``ctx``, or ``None`` on a miss."""
    entry = cache.lookup(keys.step_hash, keys.input_hash, ctx)
    if entry is None:
        return None
    try:
        _replay(entry, ctx)
    except Exception as exc:  # fail as the step itself would have
        raise StepError(step.name, index, exc) from exc
    return entry


def _invoke(step: PipelineStep, data: Any, ctx: FrozenContext, params: dict[str, Any]) -> Any:
    if isinstance(step, FunctionStep):
        return step.call_resolved(data, ctx, params)
    return step(data, ctx)


def _cache_key(step: PipelineStep, params: dict[str, Any], data: Any) -> _Keys | None:
    explicit = dict(step.params)
    injected = {k: v for k, v in params.items() if k not in explicit}
    identity, code = step.cache_identity()
    try:
        return _Keys(hash_struct("step", identity, code, explicit, injected), hash_value(data))
    except Exception as exc:
        log.warning(
            "Step %r is cacheable but its parameters or input could not be hashed "
            "(%s: %s); it runs without the cache.", step.name, type(exc).__name__, exc,
        )
        return None


def _store(
    cache: StepCache, step: PipelineStep, keys: _Keys, output: Any, recorder: _StepRecorder,
) -> CacheStatus:
    try:
        reads = read_digests(recorder.reads)
    except Exception as exc:
        log.warning(
            "Step %r read a context value that cannot be hashed (%s); its output is "
            "not cached.", step.name, exc,
        )
        return "skipped"
    entry = CacheEntry(output, list(recorder.metrics), list(recorder.added), reads,
                       list(recorder.artifacts))
    if cache.save(keys.step_hash, keys.input_hash, entry):
        return "miss"
    log.warning("Step %r: output not cached (see the warning above).", step.name)
    return "skipped"


def _replay(entry: CacheEntry, ctx: FrozenContext) -> None:
    for name, value in entry.metrics:
        ctx.metrics.add(name, value)
    for key, value in entry.added:
        ctx.add(key, value)
    for artifact in entry.artifacts:
        ctx._replay_artifact(artifact)


def _split_metrics(output: Any, ctx: FrozenContext) -> Any:
    """A ``(data, {name: value})`` return records the metrics and passes ``data`` on."""
    if type(output) is tuple and len(output) == 2 and isinstance(output[1], Mapping):
        data, metrics = output
        for name, value in metrics.items():
            ctx.metrics.add(name, value)
        return data
    return output


def _record(
    ctx: FrozenContext, step: PipelineStep, index: int, params: dict[str, Any],
    keys: _Keys | None, status: CacheStatus,
    reads: tuple[str, ...], recorder: _StepRecorder, started: float,
) -> None:
    ctx.provenance.append(StepRecord(
        name=step.name, index=index, params=params,
        step_hash=keys.step_hash if keys else None,
        input_hash=keys.input_hash if keys else None, cache=status, reads=reads,
        added=tuple(k for k, _ in recorder.added), seconds=time.perf_counter() - started,
    ))


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
