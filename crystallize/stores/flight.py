"""Single flight: when several runs need one missing entry, one computes, the others wait.

A *lease* says "I am computing this entry". Leases come in scopes, nearest first,
and a run takes each in turn before it computes:

1. :class:`ProcessLease`, in this process (threads and asyncio tasks);
2. the store's own, from its ``lease_scopes(ns, key)`` capability: a lease file
   beside the entry (:class:`~crystallize.stores.leases.StoreLease` on a
   :class:`~crystallize.stores.LocalCacheStore`:
   the processes of a pool, or machines sharing the filesystem), then a lease object
   on object storage (jobs sharing a bucket), written create-only; the Ray tier adds
   one held by its index actor (the whole cluster).

A run that finds a scope taken waits until it is free, then looks the entry up
again: found, the run is a hit that *waited*; not found (the holder failed), it
tries to take the scope itself. A lease carries an expiry that its holder's
heartbeat pushes forward every third of its lifetime, so the lease of a process
that died lapses and someone else computes. Waiting is bounded: past
:func:`max_wait` seconds a run computes without waiting any longer.

The lease protocol (:class:`Lease`) and the in-process scope live here; the
leases stores offer are in :mod:`crystallize.stores.leases`.

Example:
    >>> loop = single_flight([ProcessLease("store", "ns", "key")], lambda: None)
    >>> try:
    ...     next(loop)  # nobody else holds the lease: no wait, nothing yielded
    ... except StopIteration as done:
    ...     flight = done.value
    >>> flight.entry is None, flight.waited  # this run computes the entry
    (True, 0.0)
    >>> flight.release()
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

__all__ = ["MAX_WAIT_ENV", "Flight", "Lease", "ProcessLease", "max_wait", "single_flight"]

log = logging.getLogger("crystallize.cache")

MAX_WAIT_ENV = "CRYSTALLIZE_CACHE_MAX_WAIT"


def max_wait() -> float:
    """The longest a run waits for another to compute an entry (default 900 s; 0: never wait)."""
    return env_seconds(MAX_WAIT_ENV, 900.0)


class Lease(Protocol):
    """One scope of single flight for one entry."""

    #: Seconds between checks while waiting; doubled up to ``max_poll_seconds``.
    poll_seconds: float
    max_poll_seconds: float

    def acquire(self, cooperative: bool) -> bool:
        """Take the lease; ``False`` if another live holder has it."""

    def held(self) -> bool:
        """Whether another holder has it and its lease has not lapsed."""

    def wait(self, seconds: float) -> None:
        """Block up to ``seconds``, returning early if the lease may have been released."""

    def release(self) -> None:
        """Give the lease up (only if this process took it)."""


class Flight:
    """The outcome of :func:`single_flight` for one run and one entry.

    Attributes:
        entry: the entry another run computed while this one waited, else ``None``
            (this run computes it).
        waited: seconds this run spent waiting for others.
    """

    def __init__(self) -> None:
        self.entry: Any = None
        self.waited = 0.0
        self._held: list[Lease] = []

    def release(self) -> None:
        """Release every lease taken, farthest first; idempotent."""
        while self._held:
            self._held.pop().release()


Loop = Generator[Any, Any, Any]


def single_flight(
    leases: list[Lease], lookup: Callable[[], Any], *, cooperative: bool = False, wait_limit: float | None = None
) -> Loop:
    """Take ``leases`` in order, waiting where another run holds one (a generator).

    Args:
        leases: the scopes, nearest first.
        lookup: looks the entry up again after a wait; returns it or ``None``.
        cooperative: wait by yielding ``asyncio.sleep`` awaitables (for a run driven
            in an event loop) instead of blocking the thread.
        wait_limit: the longest to wait in all; default :func:`max_wait`.

    Returns:
        (as the generator's value) a :class:`Flight`: holding the leases to release
        once the entry is stored, or with the ``entry`` another run stored.
    """
    flight = Flight()
    limit = max_wait() if wait_limit is None else wait_limit
    if limit <= 0:  # single flight is off: every run computes what it misses
        return flight
    started = time.monotonic()
    deadline = started + limit
    try:
        for lease in leases:
            free_but_refused = 0
            while not lease.acquire(cooperative):
                if not lease.held():
                    # Refused, yet nobody holds it: a store that cannot keep leases.
                    free_but_refused += 1
                    if free_but_refused >= 3:
                        log.debug("%r: refused while free; going on without it.", lease)
                        break
                    continue
                pause = lease.poll_seconds
                while lease.held() and time.monotonic() < deadline:
                    if cooperative:
                        yield asyncio.sleep(pause)
                    else:
                        lease.wait(pause)
                    pause = min(pause * 2, lease.max_poll_seconds)
                flight.waited = time.monotonic() - started
                flight.entry = lookup()
                if flight.entry is not None:
                    flight.release()
                    return flight
                if time.monotonic() >= deadline:
                    log.warning(
                        "Waited %.0f s for another run to compute a cache entry (%r); "
                        "computing it here instead. Set $%s to wait longer.",
                        flight.waited,
                        lease,
                        MAX_WAIT_ENV,
                    )
                    return flight
            else:
                flight._held.append(lease)
        if leases:
            # Another run may have stored the entry between our miss and our lease.
            flight.entry = lookup()
            if flight.entry is not None:
                flight.release()
    except BaseException:
        flight.release()
        raise
    return flight


# -- in this process --------------------------------------------------------------------

_local_holders: dict[tuple[str, str, str], tuple[int, Any, threading.Event]] = {}
_local_lock = threading.Lock()


class ProcessLease:
    """Single flight among the threads and asyncio tasks of this process.

    A run that already holds the lease further up its own stack (a nested pipeline
    in the same thread, or a blocking run that cannot yield to the holder's task)
    goes ahead instead of waiting for itself.

    Args:
        scope: names the store (its ``repr``), so runs of one store share leases.
        namespace, key: the entry.
    """

    poll_seconds = 0.005
    max_poll_seconds = 0.05

    def __init__(self, scope: str, namespace: str, key: str) -> None:
        self._key = (scope, namespace, key)
        self._owned = False

    def acquire(self, cooperative: bool) -> bool:
        me, task = threading.get_ident(), _current_task()
        with _local_lock:
            holder = _local_holders.get(self._key)
            if holder is None:
                _local_holders[self._key] = (me, task, threading.Event())
                self._owned = True
                return True
        thread, holder_task, _ = holder
        # The holder is this thread: only a cooperative run of another task can wait.
        return thread == me and not (cooperative and holder_task is not task)

    def held(self) -> bool:
        holder = _local_holders.get(self._key)
        return holder is not None and not self._owned

    def wait(self, seconds: float) -> None:
        holder = _local_holders.get(self._key)
        if holder is not None:
            holder[2].wait(seconds)

    def release(self) -> None:
        if self._owned:
            self._owned = False
            with _local_lock:
                holder = _local_holders.pop(self._key, None)
            if holder is not None:
                holder[2].set()

    def __repr__(self) -> str:
        return f"ProcessLease({self._key[1]}/{self._key[2]})"


def _after_fork() -> None:
    global _local_lock
    _local_holders.clear()
    _local_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _current_task() -> Any:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def env_seconds(name: str, default: float) -> float:
    """Seconds from the environment variable ``name``, else ``default`` (warned if not a number)."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        log.warning("$%s=%r is not a number of seconds; using %s.", name, text, default)
        return default
    return max(value, 0.0)
