"""The actor that hosts one heavy step: built from its recipe, set up once, called by runs.

Each actor of a pool (see :mod:`crystallize_ray.pools`) is one :class:`StepHost`. Its
constructor builds the step from the recipe the driver shipped and calls ``setup()``
once, retrying a few times; a step that still fails is kept as a failure, which
``ready()`` reports, rather than raised (a raising constructor would leave Ray only a
bare "actor died"). Calls arrive from the runs' tasks with the run's data and a packed
:class:`~crystallize.backend.StepCall`; each comes back as ``("ok", packed effects,
output, queued)`` or ``("error", packed exception, traceback, queued)``, where
``queued`` is how many calls this actor holds, so a router can prefer the least loaded
(packing: :func:`crystallize_ray._router.pack`).

It is a threaded actor: at most ``max_concurrency`` calls of the step run at once
(default one: a model is rarely thread-safe), and ``ping()``, ``ready()`` and
``retire()`` run in a concurrency group of their own, so the actor answers them in the
middle of a long call. An async step runs on an event loop of the actor's own, under
the same bound.

``retire()`` calls the step's ``teardown()``: the pool calls it before the actor is
killed, when the pool is retired.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import threading
import traceback
from typing import Any

from crystallize import FrozenContext
from crystallize.backend import StepCall, StepEffects, acall_step, call_step, deserialize_step

from ._router import pack, unpack

__all__ = ["CONTROL_METHODS", "SETUP_ATTEMPTS", "StepHost"]

log = logging.getLogger("crystallize_ray")

#: How often an actor tries to build and set up its step before it reports failure.
SETUP_ATTEMPTS = 3
#: The methods that run in the actor's "control" concurrency group, never behind calls.
CONTROL_METHODS = ("ready", "ping", "retire")


class StepHost:
    """One actor of a heavy step's pool (made a Ray actor in :mod:`.pools`).

    Args:
        recipe: ``serialize_step(step, initial_ctx)`` from the driver.
        max_concurrency: calls of the step that may run at once on this actor.
        attempts: builds and ``setup()`` calls tried before giving up.
    """

    def __init__(self, recipe: bytes, max_concurrency: int = 1, attempts: int = SETUP_ATTEMPTS) -> None:
        import ray

        context = ray.get_runtime_context()
        self.where = f"actor={context.get_actor_id()} node={context.get_node_id()} pid={os.getpid()}"
        self.step: Any = None
        self.failure: tuple[str, str, str, int] | None = None
        self.queued = 0
        self.calls = 0
        self._count = threading.Lock()
        self._gate = threading.BoundedSemaphore(max_concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        for attempt in range(1, attempts + 1):
            try:
                step, initial = deserialize_step(recipe)
                self._ctx = FrozenContext(initial)
                step.setup(self._ctx)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.failure = (type(exc).__name__, str(exc), traceback.format_exc(), attempt)
                log.warning(
                    "%s: building or setting up the step failed (attempt %d of %d): %s: %s",
                    self.where,
                    attempt,
                    attempts,
                    type(exc).__name__,
                    exc,
                )
                continue
            self.step, self.failure = step, None
            break

    def ready(self) -> dict[str, Any]:
        """Whether the step is set up here; else the failure as (type, message, traceback, attempts)."""
        return {"ok": self.failure is None, "failure": self.failure, "where": self.where}

    def ping(self) -> dict[str, Any]:
        """A cheap liveness check: where the actor is, and how busy."""
        return {"ok": self.failure is None, "where": self.where, "queued": self.queued, "calls": self.calls}

    def call(self, data: Any, payload: bytes) -> tuple[Any, ...]:
        """Call the step once; never raises for the step's own failures (they come back as data)."""
        with self._count:
            self.queued += 1
        try:
            if self.failure is not None:
                kind, message, text, _ = self.failure
                return ("setup", kind, message, text, self.queued - 1)
            call: StepCall = unpack(payload)
            with self._gate:
                self.calls += 1
                try:
                    if self.step.is_async():
                        effects: StepEffects = asyncio.run_coroutine_threadsafe(
                            acall_step(self.step, data, call), self._event_loop()
                        ).result()
                    else:
                        effects = call_step(self.step, data, call)
                except BaseException as exc:  # the run records it, as if the step ran there
                    return ("error", pack(_portable(exc)), traceback.format_exc(), self.queued - 1)
            output, effects.output, effects.served_by = effects.output, None, self.where
            return ("ok", pack(effects), output, self.queued - 1)
        finally:
            with self._count:
                self.queued -= 1

    def retire(self) -> bool:
        """Call the step's ``teardown()``; whether it ran without raising."""
        step, self.step = self.step, None
        if step is None:
            return True
        try:
            step.teardown(self._ctx)
        except BaseException as exc:  # logged: the results stand
            log.error("%s: teardown() of %s raised %s: %s", self.where, type(step).__name__, type(exc).__name__, exc)
            return False
        finally:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
        return True

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The actor's event loop for async steps, running in a thread of its own."""
        with self._count:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="crystallize-step-loop", daemon=True).start()
                self._loop = loop
        return self._loop


def _portable(exc: BaseException) -> BaseException:
    """``exc``, or a stand-in with its type's name and message when it cannot be pickled."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        try:
            import cloudpickle

            cloudpickle.loads(cloudpickle.dumps(exc))
        except Exception:
            return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
