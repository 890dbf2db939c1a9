"""The in-process backends: serial and asyncio.

Both are written against the backend kit (``crystallize.backend``), like every other
backend.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

from .backend import (
    GRACE_SECONDS,
    WAIT_SLICE_SECONDS,
    ExecutionBackend,
    RunResult,
    RunSpec,
    check_option,
    failed_run,
    is_int,
    is_seconds,
    running_step,
    steps_set_up,
    timed_out,
)
from .context import active_context
from .errors import ConfigurationError

__all__ = ["AsyncExecution", "ExecutionBackend", "SerialExecution"]


class SerialExecution(ExecutionBackend):
    """Run every run one after another in this process (the default backend).

    On Ctrl-C the run in progress is abandoned where it stands, the steps are torn
    down, and ``run()`` raises ``KeyboardInterrupt`` with the finished runs in
    ``exc.partial_result``.

    Args:
        progress: show a progress line over runs.
        timeout: not supported: a run in this process cannot be stopped from outside.
            Given anyway, it raises ``ConfigurationError`` naming the backends that can.

    Raises:
        ConfigurationError: ``timeout`` was given.
    """

    def __init__(self, progress: bool = False, *, timeout: float | None = None) -> None:
        if timeout is not None:
            raise ConfigurationError(
                "SerialExecution",
                "timeout",
                timeout,
                "None: runs execute in this process, and a run that hangs cannot be stopped "
                "from outside. Use ParallelExecution(executor_type='process', timeout=...) "
                "(the run's worker is killed and replaced), AsyncExecution(timeout=...) for "
                "async steps, or RayExecution(timeout=...)",
            )
        self.progress = progress

    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        with steps_set_up(experiment) as host:
            for spec in plan:
                yield host.run(spec.replicate, spec.condition)


class AsyncExecution(ExecutionBackend):
    """Run runs concurrently as asyncio tasks in one event loop (for I/O-bound steps).

    Sync steps run in the loop too and block it while they run; async steps overlap.
    Under ``run()`` the loop runs in a helper thread, so results stream to the
    driver as they finish; under ``arun()`` it is the caller's loop.

    On Ctrl-C (or when ``arun()`` is cancelled) no new run starts, the runs in
    flight get half a second to finish and are then cancelled, every run that
    finished is kept in ``exc.partial_result``, and the steps are torn down. A sync
    step that blocks the loop cannot be cancelled: ``run()`` stops waiting for it
    after a short grace and leaves it to the daemon helper thread.

    With ``timeout=``, a run still going after that many seconds is cancelled and
    recorded as a ``TimeoutError`` naming the step it was in; the others go on. A
    cancellation lands at the run's next ``await``: a sync step that blocks the loop
    cannot be stopped (use the process pool for those).

    Args:
        max_concurrency: the most runs in flight at once (default 64).
        progress: show a progress line over runs.
        timeout: seconds a run may take; ``None``: no limit.

    Example:
        >>> backend = AsyncExecution(max_concurrency=16, timeout=30)
    """

    async_native = True
    supports_timeout = True

    def __init__(self, max_concurrency: int = 64, progress: bool = False, *, timeout: float | None = None) -> None:
        check_option("AsyncExecution", "max_concurrency", max_concurrency, lambda v: is_int(v, 1), "an integer >= 1")
        check_option(
            "AsyncExecution",
            "timeout",
            timeout,
            lambda v: v is None or is_seconds(v),
            "None or a number of seconds > 0",
        )
        self.max_concurrency = max_concurrency
        self.progress = progress
        self.timeout = timeout

    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        # The event loop runs in a helper thread so results stream to the driver (and
        # its progress line and hooks) as they finish, not all at the end.
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

        async def pump() -> None:
            async for run in self.aexecute(experiment, plan):
                inbox.put(run)

        helper = _LoopThread(pump, inbox, name="crystallize-AsyncExecution")
        try:
            while True:
                try:
                    item = inbox.get(timeout=WAIT_SLICE_SECONDS)
                except queue.Empty:
                    continue
                if item is _DONE:
                    break
                if isinstance(item, _Raised):
                    raise item.exc
                yield item
        except KeyboardInterrupt:
            helper.cancel()
            # The loop gives its runs GRACE_SECONDS to finish and as long to unwind
            # once cancelled, then hands out those that finished.
            deadline = time.monotonic() + 3 * GRACE_SECONDS
            while True:  # the runs the loop hands out while it cancels the others
                try:
                    item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _DONE:
                    break
                if isinstance(item, RunResult):
                    yield item
            raise
        finally:
            helper.cancel()  # a no-op once the loop has finished

    async def aexecute(self, experiment: Any, plan: Sequence[RunSpec]) -> AsyncIterator[RunResult]:
        with steps_set_up(experiment) as host:
            specs = iter(plan)
            running: dict[asyncio.Future[RunResult], RunSpec] = {}
            ready: deque[RunResult] = deque()
            clock = _Deadlines(self.timeout)
            try:
                while True:
                    for spec in specs:
                        running[clock.start(host.arun(spec.replicate, spec.condition))] = spec
                        if len(running) >= self.max_concurrency:
                            break
                    if not running:
                        return
                    finished, _ = await asyncio.wait(
                        running, timeout=clock.wait(running), return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in finished:
                        ready.append(_outcome(task, running.pop(task)))
                    ready.extend(clock.expire(experiment, running))
                    while ready:
                        yield ready.popleft()
            except (asyncio.CancelledError, KeyboardInterrupt):
                # Ctrl-C, or the caller cancelled: no new run; the runs in flight get a
                # short grace, then are cancelled; what finished is handed out.
                if running:
                    await asyncio.wait(running, timeout=GRACE_SECONDS)
                ready.extend(await _cancel(running))
                while ready:
                    yield ready.popleft()
                raise
            finally:
                await _cancel(running)  # on any other way out; steps are torn down after
                await _cancel(clock.abandoned)


class _Deadlines:
    """Each run's start, and the runs of ``AsyncExecution(timeout=...)`` that ran past it.

    Each run's task gets a context of its own, so the run's FrozenContext (the step
    it is in) can be read from outside when it is overdue.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.started: dict[asyncio.Future[RunResult], tuple[float, contextvars.Context]] = {}
        self.abandoned: dict[asyncio.Future[RunResult], RunSpec] = {}  # cancelled, not yet unwound

    def start(self, run: Any) -> asyncio.Future[RunResult]:
        if self.timeout is None:
            return asyncio.ensure_future(run)
        context = contextvars.copy_context()
        task = asyncio.get_running_loop().create_task(run, context=context)  # Python 3.11+
        self.started[task] = (time.monotonic(), context)
        return task

    def wait(self, running: dict[asyncio.Future[RunResult], RunSpec]) -> float | None:
        """How long until the first running run is overdue (``None``: no timeout)."""
        if self.timeout is None:
            return None
        first = min(self.started[task][0] for task in running)
        return max(0.0, first + self.timeout - time.monotonic())

    def expire(self, experiment: Any, running: dict[asyncio.Future[RunResult], RunSpec]) -> list[RunResult]:
        """Cancel the overdue runs; their TimeoutError records."""
        if self.timeout is None:
            return []
        for task in [t for t in self.started if t not in running]:
            del self.started[task]
        now, out = time.monotonic(), []
        for task in [t for t in running if now - self.started[t][0] >= self.timeout]:
            spec = running.pop(task)
            _, context = self.started.pop(task)
            step, line, text = running_step(experiment, _awaiting(task), context.run(active_context))
            task.cancel()
            self.abandoned[task] = spec
            out.append(timed_out(spec, self.timeout, step, line, text, stopped="it was cancelled"))
        return out


def _outcome(task: asyncio.Future[RunResult], spec: RunSpec) -> RunResult:
    if task.cancelled():
        # The runner records every failure, so only a cancel aimed at the run's own
        # task gets here (a step cancelling itself); it fails this run alone.
        return failed_run(spec, "run", "CancelledError", "The run's asyncio task was cancelled.")
    return task.result()


def _succeeded(task: asyncio.Future[RunResult]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


async def _cancel(running: dict[asyncio.Future[RunResult], RunSpec]) -> list[RunResult]:
    """Cancel every task not done; give them a short grace to unwind before the teardown.

    Returns:
        the results of the tasks that had finished all the same.
    """
    tasks = list(running)
    running.clear()
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=GRACE_SECONDS)
    return [task.result() for task in tasks if _succeeded(task)]


def _awaiting(task: asyncio.Future[Any]) -> list[Any]:
    """The frames of the coroutines ``task`` is suspended in, outermost first."""
    frames: list[Any] = []
    coro = getattr(task, "get_coro", lambda: None)()
    while coro is not None and len(frames) < 200:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


class _Raised:
    """What the event loop's thread raised, for the driver to re-raise."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()  # the event loop's thread has finished


class _LoopThread:
    """``asyncio.run(main())`` in a daemon thread, cancellable from any thread.

    Everything ``main`` does not put in ``inbox`` itself arrives there too: what it
    raised (as :class:`_Raised`), then ``_DONE``.
    """

    def __init__(self, main: Callable[[], Awaitable[None]], inbox: queue.SimpleQueue[Any], name: str) -> None:
        self._main = main
        self._inbox = inbox
        self._lock = threading.Lock()
        self._cancelled = False
        self._task: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def cancel(self) -> None:
        """Cancel ``main`` (or keep it from starting); idempotent."""
        with self._lock:
            self._cancelled = True
            if self._task is not None:
                loop, task = self._task
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:  # the loop is closed: main has finished already
                    pass

    def _run(self) -> None:
        try:
            asyncio.run(self._guarded())
        except BaseException as exc:  # re-raised in the driver
            self._inbox.put(_Raised(exc))
        finally:
            self._inbox.put(_DONE)

    async def _guarded(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        with self._lock:
            if self._cancelled:
                return
            self._task = (asyncio.get_running_loop(), task)
        await self._main()
