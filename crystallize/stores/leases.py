"""Leases that stores offer for single flight beyond this process (see :mod:`crystallize.stores.flight`).

:class:`StoreLease` is a small object ``<key>.lease`` beside the entry, written
create-only: a file in a cache directory (the processes of a pool; machines sharing
the filesystem) or an object in a bucket (jobs sharing it). It holds its holder's
name and an expiry, which this process's heartbeat thread pushes forward every
third of :func:`lease_seconds`; a lease whose holder died lapses, and the next run
that wants it deletes it and takes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ._warn import warn_once
from .flight import env_seconds

__all__ = ["HOLDER", "LEASE_SECONDS_ENV", "GuardedLease", "StoreLease", "lease_seconds"]

log = logging.getLogger("crystallize.cache")

LEASE_SECONDS_ENV = "CRYSTALLIZE_CACHE_LEASE_SECONDS"
_LEASE_SUFFIX = ".lease"
_LINGER = 0.5
#: This process, as a lease holder: the host, the pid, and a random tag (pids recycle).
HOLDER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_seconds() -> float:
    """How long a lease lives without its holder's heartbeat (default 60 s)."""
    return env_seconds(LEASE_SECONDS_ENV, 60.0)


class StoreLease:
    """A lease object ``<key>.lease`` beside the entry, written create-only.

    It holds the holder's name and an expiry (wall-clock seconds); the heartbeat
    rewrites it every third of :func:`lease_seconds`. A lease past its expiry is
    deleted and taken by the next run that wants it.

    Args:
        store: a store with the ``put_new`` capability.
        namespace, key: the entry.
        poll_seconds: the first pause between checks while waiting (doubled each time).
        max_poll_seconds: the longest pause: how late a waiter may notice the release.
    """

    def __init__(
        self, store: Any, namespace: str, key: str, *, poll_seconds: float = 0.05, max_poll_seconds: float = 0.5
    ) -> None:
        self.store = store
        self.namespace, self.key = namespace, key + _LEASE_SUFFIX
        self.poll_seconds = poll_seconds
        self.max_poll_seconds = max(poll_seconds, max_poll_seconds)
        self._token: str | None = None

    def acquire(self, cooperative: bool) -> bool:
        token = f"{HOLDER}:{uuid.uuid4().hex[:8]}"
        for _ in range(2):
            if self.store.put_new(self.namespace, self.key, self._body(token)):
                self._token = token
                _heartbeat.add(self)
                return True
            current = self._read()
            if current is not None and current.get("expires", 0) > time.time():
                return False
            # Lapsed (its holder died) or unreadable: clear it, then race for it once.
            self.store.delete(self.namespace, self.key)
        return False

    def held(self) -> bool:
        current = self._read()
        return current is not None and current.get("expires", 0) > time.time()

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    def renew(self) -> None:
        if self._token is not None:
            self.store.put(self.namespace, self.key, self._body(self._token))

    def release(self) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        _heartbeat.discard(self)
        current = self._read()
        if current is not None and current.get("holder") == token:
            self.store.delete(self.namespace, self.key)

    def _body(self, token: str) -> bytes:
        return json.dumps({"holder": token, "expires": time.time() + lease_seconds()}).encode()

    def _read(self) -> dict[str, Any] | None:
        blob = self.store.get(self.namespace, self.key)
        if blob is None:
            return None
        try:
            found = json.loads(blob)
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def __repr__(self) -> str:
        return f"StoreLease({self.store!r}, {self.namespace}/{self.key})"


class GuardedLease:
    """A lease whose store errors (``OSError``) let the run compute, with one warning.

    A lease that cannot be taken is treated as taken (the run computes), one that
    cannot be read as free; the store's problem is warned about once per process
    (the run's own reads and writes of the store warn separately if they fail too).

    Args:
        lease: the lease to guard.
        store: the store, for the message.
    """

    def __init__(self, lease: Any, store: Any) -> None:
        self.lease, self.store = lease, store
        self.poll_seconds = lease.poll_seconds
        self.max_poll_seconds = lease.max_poll_seconds

    def acquire(self, cooperative: bool) -> bool:
        return self._call(True, lambda: self.lease.acquire(cooperative))

    def held(self) -> bool:
        return self._call(False, self.lease.held)

    def wait(self, seconds: float) -> None:
        self._call(None, lambda: self.lease.wait(seconds))

    def release(self) -> None:
        self._call(None, self.lease.release)

    def _call(self, default: Any, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except OSError as exc:
            warn_once(
                (repr(self.store), "lease", type(exc).__name__, exc.errno),
                "Single flight on cache store %r is unavailable (%s: %s); runs that need the "
                "same missing entry may each compute it (said once per process).",
                self.store,
                type(exc).__name__,
                exc,
            )
            return default

    def __repr__(self) -> str:
        return repr(self.lease)


class _Heartbeat:
    """One daemon thread per process that keeps this process's leases alive.

    It renews every lease it holds each third of :func:`lease_seconds`, and exits
    half a second after the last lease is released (a later lease starts it again),
    so a process that computes nothing has no thread for it.
    """

    def __init__(self) -> None:
        self._leases: set[Any] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset()

    def add(self, lease: Any) -> None:
        with self._lock:
            self._leases.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="crystallize-leases", daemon=True)
                self._thread.start()
            else:
                self._wake.set()

    def discard(self, lease: Any) -> None:
        with self._lock:
            self._leases.discard(lease)
            if not self._leases:
                self._wake.set()

    def _beat(self) -> None:
        due = time.monotonic() + lease_seconds() / 3
        while True:
            with self._lock:
                idle = not self._leases
            woke = self._wake.wait(_LINGER if idle else max(0.0, due - time.monotonic()))
            self._wake.clear()
            with self._lock:
                if not self._leases:
                    if not woke:  # idle for a while: this thread is no longer needed
                        self._thread = None
                        return
                    continue
                leases = list(self._leases)
            if time.monotonic() >= due:
                due = time.monotonic() + lease_seconds() / 3
                for lease in leases:
                    try:
                        lease.renew()
                    except Exception as exc:  # the lease may lapse; then someone else computes
                        log.debug("Could not renew %r: %s", lease, exc)

    def reset(self) -> None:
        """Start afresh (also in a forked child: no lease of the parent is its to renew)."""
        self._leases = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None


_heartbeat = _Heartbeat()


def _after_fork() -> None:
    global HOLDER
    HOLDER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _heartbeat.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
