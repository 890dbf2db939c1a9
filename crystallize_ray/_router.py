"""In a run's worker: calls to a heavy step's actor pool, least loaded first, retried on a live actor.

The driver gives each task a :class:`PoolHandle` per pooled step (the actors, placed
and set up before any run was submitted). A worker process keeps one :class:`Router`
per pool for as long as the pool lives. For each call it picks the actor with the
fewest calls in flight, counting both this process's own calls and the queue length
the actor reported with its last reply, and never sends an actor more than
``max_in_flight`` calls from this process at once (it waits for one to finish). The
call's data goes as a Ray argument, so a large array travels through the object
store once and the actor reads it without a copy; the step's output comes back the
same way. The :class:`~crystallize.backend.StepCall` and the rest of the effects travel
as bytes pickled here (:func:`pack`): Ray moves bytes far faster than objects it must
pickle itself.

Waiting on a call never releases the task's CPU (``await`` on the reference's future,
not ``ray.get``), so Ray does not start extra worker processes for runs that only wait.

When an actor dies mid-call (killed, its node lost) the call is retried on another
live actor — Ray restarts the dead one in its placement, and it rejoins when it
answers again — up to ``retries`` times per call. A step that raised comes back as
its own exception, with the actor's traceback as its cause, and is the run's failure
like any step's.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import time
from dataclasses import dataclass
from typing import Any

from crystallize import CrystallizeError
from crystallize.backend import StepCall, StepEffects

__all__ = ["PoolError", "PoolHandle", "Router", "pack", "router", "unpack"]

#: After a call to an actor failed because the actor died, how long it is skipped.
DOWN_SECONDS = 2.0
_SATURATED_SLEEP = 0.002


class PoolError(CrystallizeError):
    """A heavy step's actor pool could not serve a call (every actor dead or never set up)."""


@dataclass(frozen=True)
class PoolHandle:
    """What a task needs to call one pool: made by the driver, shipped with the task.

    Attributes:
        step: the step's name, for messages.
        key: identifies the pool (its recipe and resources).
        generation: changes whenever the pool's actors change (grown, replaced), so a
            worker makes a new router for them.
        actors: the pool's actor handles.
        max_in_flight: the most calls one process has at one actor at once.
        retries: how often a call is sent again after the actor serving it died.
        cpus: the CPUs each actor holds (the driver counts them out of the task slots).
    """

    step: str
    key: str
    generation: str
    actors: tuple[Any, ...]
    max_in_flight: int = 2
    retries: int = 3
    cpus: float = 1.0


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a pool actor; the exception's ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n(in the pool actor)\n{self.text}"


class Router:
    """Routes one pool's calls from this process: least loaded, bounded, retried."""

    def __init__(self, handle: PoolHandle) -> None:
        self.handle = handle
        count = len(handle.actors)
        self.in_flight = [0] * count
        self.reported = [0] * count
        self.down_until = [0.0] * count
        self.broken: dict[int, str] = {}  # actors whose step failed to set up after a restart
        self._turn = random.Random(os.getpid()).randrange(max(count, 1))

    def invoke(self, step: Any, data: Any, call: StepCall) -> Any:
        """The step invoker (see ``crystallize.backend.StepInvoker``): an awaitable of effects."""
        return self.call(data, call)

    async def call(self, data: Any, call: StepCall) -> StepEffects:
        """Send one call to the least-loaded live actor; retry on another if it dies.

        Raises:
            Exception: the step's own exception, with the actor's traceback as cause.
            PoolError: no actor could serve the call within ``retries`` attempts.
        """
        import ray

        lost: list[str] = []
        payload = pack(call)
        while True:
            index = await self._pick()
            actor = self.handle.actors[index]
            self.in_flight[index] += 1
            try:
                # Through the reference's concurrent future: measured ~0.1 ms a call
                # cheaper than awaiting the ObjectRef itself, with the same exceptions.
                reply = await asyncio.wrap_future(actor.call.remote(data, payload).future())
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                self.down_until[index] = time.monotonic() + DOWN_SECONDS
                lost.append(_first_line(exc))
                if len(lost) > self.handle.retries:
                    raise PoolError(
                        f"Step {self.handle.step!r}: the pool actors serving this call died "
                        f"{len(lost)} times ({lost[-1]}); the call was not retried again. "
                        f"Raise RayExecution(max_retries=...) or check the actors' memory."
                    ) from exc
                continue
            finally:
                self.in_flight[index] -= 1
            kind = reply[0]
            if kind == "ok":  # ("ok", effects without output, output, queued)
                self.reported[index] = reply[3]
                effects: StepEffects = unpack(reply[1])
                effects.output = reply[2]
                return effects
            if kind == "error":  # ("error", exception, traceback text, queued)
                self.reported[index] = reply[3]
                raised: BaseException = unpack(reply[1])
                raised.__cause__ = _RemoteTraceback(reply[2])
                raise raised
            # "setup": this actor came back after a restart but its step failed to set up
            self.broken[index] = f"{reply[1]}: {reply[2]}"
            if len(self.broken) == len(self.handle.actors):
                raise PoolError(
                    f"Step {self.handle.step!r}: every actor of its pool failed to set the step "
                    f"up again after a restart; last: {reply[1]}: {reply[2]}"
                )

    async def _pick(self) -> int:
        """The index of the actor to call: live, under the bound, least loaded."""
        count = len(self.handle.actors)
        if count == 0:
            raise PoolError(f"Step {self.handle.step!r}: its pool has no actors.")
        while True:
            now = time.monotonic()
            usable = [i for i in range(count) if i not in self.broken]
            live = [i for i in usable if self.down_until[i] <= now] or usable
            open_ = [i for i in live if self.in_flight[i] < self.handle.max_in_flight]
            if open_:
                self._turn = (self._turn + 1) % count
                return min(open_, key=lambda i: (self.in_flight[i] + self.reported[i], (i - self._turn) % count))
            await asyncio.sleep(_SATURATED_SLEEP)


def pack(obj: Any) -> bytes:
    """``obj`` as bytes for the trip between a run and a pool actor (cloudpickle if need be)."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:  # e.g. a class of the user's that travelled by value
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=5)


def unpack(blob: bytes) -> Any:
    """The inverse of :func:`pack`."""
    return pickle.loads(blob)


_ROUTERS: dict[str, Router] = {}


def router(handle: PoolHandle) -> Router:
    """This process's router for ``handle``'s pool (one per pool generation, kept)."""
    found = _ROUTERS.get(handle.generation)
    if found is None:
        # A new generation of a pool replaces the routers of older ones for that key.
        for stale in [g for g, r in _ROUTERS.items() if r.handle.key == handle.key]:
            del _ROUTERS[stale]
        found = _ROUTERS[handle.generation] = Router(handle)
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
