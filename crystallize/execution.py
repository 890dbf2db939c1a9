"""The in-process backends: serial and asyncio.

Both are written against the backend kit (``crystallize.backend``), like every other
backend.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from .backend import ExecutionBackend, RunResult, RunSpec, check_option, is_int, steps_set_up

__all__ = ["AsyncExecution", "ExecutionBackend", "SerialExecution"]


class SerialExecution(ExecutionBackend):
    """Run every run one after another in this process (the default backend).

    Args:
        progress: show a progress line over runs.
    """

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        with steps_set_up(experiment) as host:
            for spec in plan:
                yield host.run(spec.replicate, spec.condition)


class AsyncExecution(ExecutionBackend):
    """Run runs concurrently as asyncio tasks in one event loop (for I/O-bound steps).

    Sync steps run in the loop too and block it while they run; async steps overlap.

    Args:
        max_concurrency: the most runs in flight at once (default 64).
        progress: show a progress line over runs.
    """

    async_native = True

    def __init__(self, max_concurrency: int = 64, progress: bool = False) -> None:
        check_option("AsyncExecution", "max_concurrency", max_concurrency, lambda v: is_int(v, 1),
                     "an integer >= 1")
        self.max_concurrency = max_concurrency
        self.progress = progress

    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
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

    async def aexecute(self, experiment: Any, plan: Sequence[RunSpec]) -> AsyncIterator[RunResult]:
        with steps_set_up(experiment) as host:
            specs = iter(plan)
            running: set[asyncio.Future[RunResult]] = set()
            while True:
                for spec in specs:
                    running.add(asyncio.ensure_future(host.arun(spec.replicate, spec.condition)))
                    if len(running) >= self.max_concurrency:
                        break
                if not running:
                    return
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    yield task.result()
