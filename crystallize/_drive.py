"""Drive a step loop: a generator that yields the awaitables it needs resolved.

Writing the run logic once as such a generator lets the same code run synchronously
(an event loop is opened only when something is actually async) and inside a caller's
event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Generator
from typing import Any

from .errors import PipelineError

Loop = Generator[Awaitable[Any], Any, Any]

__all__ = ["Loop", "adrive", "drive", "driven_async", "is_interrupt", "loop_running"]

# Whether the loop being advanced is driven by adrive (its awaitables are awaited in
# the caller's event loop) rather than by drive (which blocks this thread).
_DRIVEN_ASYNC: contextvars.ContextVar[bool] = contextvars.ContextVar("crystallize_driven_async", default=False)


def driven_async() -> bool:
    """Whether the step loop running now is driven by :func:`adrive`.

    A loop that has to wait (for another run computing a cache entry) yields
    ``asyncio.sleep`` awaitables then, so other runs in the event loop go on; under
    :func:`drive` it blocks its thread instead.
    """
    return _DRIVEN_ASYNC.get()


def drive(loop: Loop) -> Any:
    """Run ``loop`` to completion in this thread and return its value."""
    event_loop: asyncio.AbstractEventLoop | None = None
    send: Any = None
    error: BaseException | None = None
    mode = _DRIVEN_ASYNC.set(False)
    try:
        while True:
            try:
                pending = loop.throw(error) if error else loop.send(send)
            except StopIteration as done:
                return done.value
            if event_loop is None:
                if loop_running():
                    raise loop_error()
                event_loop = asyncio.new_event_loop()
            try:
                send, error = event_loop.run_until_complete(_await(pending)), None
            except BaseException as exc:
                if is_interrupt(exc):
                    raise
                send, error = None, exc
    finally:
        _DRIVEN_ASYNC.reset(mode)
        loop.close()
        if event_loop is not None:
            event_loop.close()


async def adrive(loop: Loop) -> Any:
    """Run ``loop`` to completion in the running event loop and return its value."""
    send: Any = None
    error: BaseException | None = None
    mode = _DRIVEN_ASYNC.set(True)
    try:
        while True:
            try:
                pending = loop.throw(error) if error else loop.send(send)
            except StopIteration as done:
                return done.value
            try:
                send, error = await pending, None
            except BaseException as exc:
                if is_interrupt(exc):
                    raise
                send, error = None, exc
    finally:
        _DRIVEN_ASYNC.reset(mode)
        loop.close()


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` must stop the experiment rather than fail one run.

    Only Ctrl-C (``KeyboardInterrupt``), a generator being closed, and the
    cancellation of the asyncio task running the run stop it. ``sys.exit()``, a stray
    ``CancelledError`` or a custom ``BaseException`` raised by a step fail that run.
    """
    if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
        return True
    if isinstance(exc, asyncio.CancelledError):
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: nothing of ours is being cancelled
            return False
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        return task is not None and (cancelling is None or cancelling() > 0)
    return False


def loop_running() -> bool:
    """Whether this thread is inside a running asyncio event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def loop_error() -> PipelineError:
    return PipelineError(
        "A synchronous run() was called inside a running event loop and the work has "
        "async steps. Use `await pipeline.arun(data, ctx)` or "
        "`await experiment.arun(...)` instead."
    )


async def _await(pending: Awaitable[Any]) -> Any:
    return await pending
