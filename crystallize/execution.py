"""The backend interface, and the in-process backends: serial and asyncio.

A backend decides *where* runs execute. It receives the experiment (prepared for this
``run()``) and the plan, a list of :class:`RunSpec`, and yields one
:class:`RunResult` per spec, in any order. It never needs to know what a step does;
the driver aggregates, calls ``on_run_result`` hooks and shows progress.

To write a backend (``RayExecution`` is one), subclass :class:`ExecutionBackend` and
implement :meth:`ExecutionBackend.execute`; use :func:`execute_run` (or the
serialized form via ``serialize_experiment``) to run each spec, and
:func:`steps_set_up` around the runs of each process that hosts steps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .plugins import BasePlugin
from .result import RunResult
from .runner import RunSpec, aexecute_run, execute_run, steps_set_up

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = ["AsyncExecution", "ExecutionBackend", "SerialExecution"]


class ExecutionBackend(BasePlugin):
    """Where an experiment's runs execute; give one in ``Experiment(plugins=[...])``.

    Attributes:
        progress: whether the driver shows a progress line over runs.
    """

    progress: bool = False

    def execute(self, experiment: Experiment, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        """Yield one RunResult per spec in ``plan``, in any order."""
        raise NotImplementedError(f"{type(self).__name__} must implement execute().")

    async def aexecute(self, experiment: Experiment, plan: Sequence[RunSpec]) -> AsyncIterator[RunResult]:
        """Async form of :meth:`execute`; by default runs ``execute`` in a thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def pump() -> None:
            try:
                for run in self.execute(experiment, plan):
                    loop.call_soon_threadsafe(queue.put_nowait, run)
            except BaseException as exc:  # re-raised in the event loop below
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        thread = threading.Thread(target=pump, name=f"crystallize-{type(self).__name__}", daemon=True)
        thread.start()
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()


class SerialExecution(ExecutionBackend):
    """Run every run one after another in this process (the default backend).

    Args:
        progress: show a progress line over runs.
    """

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def execute(self, experiment: Experiment, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        with steps_set_up(experiment):
            for spec in plan:
                yield execute_run(experiment, spec.replicate, spec.condition)


class AsyncExecution(ExecutionBackend):
    """Run runs concurrently as asyncio tasks in one event loop (for I/O-bound steps).

    Sync steps run in the loop too and block it while they run; async steps overlap.

    Args:
        max_concurrency: the most runs in flight at once (default 64).
        progress: show a progress line over runs.
    """

    def __init__(self, max_concurrency: int = 64, progress: bool = False) -> None:
        if max_concurrency < 1:
            raise ValueError(f"AsyncExecution(max_concurrency=...) must be >= 1, got {max_concurrency}.")
        self.max_concurrency = max_concurrency
        self.progress = progress

    def execute(self, experiment: Experiment, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        # The event loop runs in a helper thread so results stream to the driver (and
        # its progress line and hooks) as they finish, not all at the end.
        results: queue.Queue[Any] = queue.Queue()
        done = object()

        async def pump() -> None:
            async for run in self.aexecute(experiment, plan):
                results.put(run)

        def loop() -> None:
            try:
                asyncio.run(pump())
            except BaseException as exc:  # re-raised in the driver below
                results.put(exc)
            finally:
                results.put(done)

        thread = threading.Thread(target=loop, name="crystallize-AsyncExecution", daemon=True)
        thread.start()
        while (item := results.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()

    async def aexecute(self, experiment: Experiment, plan: Sequence[RunSpec]) -> AsyncIterator[RunResult]:
        with steps_set_up(experiment):
            specs = iter(plan)
            running: set[asyncio.Task[RunResult]] = set()
            while True:
                for spec in specs:
                    running.add(asyncio.ensure_future(
                        aexecute_run(experiment, spec.replicate, spec.condition)))
                    if len(running) >= self.max_concurrency:
                        break
                if not running:
                    return
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    yield task.result()
