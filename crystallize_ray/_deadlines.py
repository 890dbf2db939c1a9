"""Per-run timeouts on Ray: a small actor that tells the driver which runs ran too long.

With ``RayExecution(timeout=S)`` each task carries one run. When the run starts, its
worker tells the board (fire and forget) and arms SIGALRM for ``S`` seconds; if the
alarm goes off, the worker reads which step the run is in and reports it. The driver
keeps one long-poll call to :meth:`TimeoutBoard.next` outstanding; for each report it
cancels the task with ``ray.cancel(force=True)`` (which kills the worker; Ray starts
another) and records a ``TimeoutError`` naming the step. A worker that cannot report
(stuck in native code that holds the GIL) is caught by the board's own clock one
second later, and its run is recorded as timed out in step ``"run"``.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["FALLBACK_SECONDS", "TimeoutBoard"]

#: How long after the timeout the board reports a run whose worker said nothing.
FALLBACK_SECONDS = 1.0


class TimeoutBoard:
    """The driver's view of runs that exceeded their timeout (a Ray actor, no CPU).

    Args:
        timeout: seconds a run may take.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.events: list[tuple[Any, ...]] = []
        self.clocks: dict[tuple[int, tuple[int, str]], asyncio.TimerHandle] = {}
        self.wake: asyncio.Event | None = None

    def _post(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)
        if self.wake is not None:
            self.wake.set()

    async def started(self, batch_id: int, run: tuple[int, str]) -> None:
        """A run began in its worker: start the fallback clock."""
        loop = asyncio.get_running_loop()
        key = (batch_id, (int(run[0]), str(run[1])))
        self.clocks[key] = loop.call_later(self.timeout + FALLBACK_SECONDS, self._silent, key)

    def _silent(self, key: tuple[int, tuple[int, str]]) -> None:
        self.clocks.pop(key, None)
        self._post((key[0], key[1], "run", "", ""))

    async def expired(self, batch_id: int, run: tuple[int, str], step: str, line: str, stack: str) -> None:
        """A worker's report: its run passed the timeout in ``step``, at ``line``."""
        key = (batch_id, (int(run[0]), str(run[1])))
        clock = self.clocks.pop(key, None)
        if clock is not None:
            clock.cancel()
        self._post((batch_id, key[1], step, line, stack))

    async def finished(self, batch_ids: list[int]) -> None:
        """The driver got these batches back: stop their clocks."""
        done = set(batch_ids)
        for key in [k for k in self.clocks if k[0] in done]:
            self.clocks.pop(key).cancel()

    async def next(self) -> list[tuple[Any, ...]]:
        """Wait for reports; return them (``(batch_id, run, step, line, stack)`` each)."""
        if self.wake is None:
            self.wake = asyncio.Event()
        while not self.events:
            self.wake.clear()
            await self.wake.wait()
        events, self.events = self.events, []
        return events
