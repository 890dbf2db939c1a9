"""The in-cluster cache tier: step outputs shared through Ray's object store.

With ``RayExecution(object_store_cache=True)`` (the default) the experiment's cache
store gets one more tier, between each node's local directory and the durable store::

    run ──► node-local directory ──► this tier (Ray object store) ──► durable store

A named index actor (``crystallize-cache-index`` in Ray namespace ``crystallize``,
``num_cpus=0``, see :mod:`crystallize_ray._cache_index`) maps each stored object —
manifests and output blobs, keyed by the durable store they belong to — to its
bytes (small objects, kept in the actor) or to an object in Ray's object store that
the index put there itself. The index *owns* those objects, so they outlive the task
and the worker that made them (Ray frees an object with its owner; handing ownership
to another process, ``ray.put(_owner=...)``, is gone since Ray 2.56). A worker on
another node then reads them through the object store, touching neither the bucket
nor a disk. The index keeps at most ``max_bytes`` and forgets the least recently
used objects first. It is detached, started by the first worker that needs it: one
per cluster, serving later jobs too (entries are signed and checked as from any
store). ``ray.kill(ray.get_actor("crystallize-cache-index", namespace="crystallize"))``
frees all it holds.

The index also holds single-flight leases for the whole cluster: one worker computes
a missing entry, the others wait on the actor (no polling) and reuse it. A lease
expires unless its holder's heartbeat renews it, so a dead worker's lease lapses.

Every failure here steps aside: a lost object (``ObjectLostError``,
``OwnerDiedError``) is read from the durable store; an index that cannot be reached
costs one warning per process, and the runs go on with the other tiers.

The tier imports only Ray and the public ``crystallize`` surface; it implements the
store interface and the lease protocol of :mod:`crystallize.stores` by their shape.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ._cache_index import CacheIndex

__all__ = ["DEFAULT_TIER_BYTES", "INDEX_NAME", "INDEX_NAMESPACE", "ObjectStoreTier", "share_outputs"]

log = logging.getLogger("crystallize_ray")

INDEX_NAME = "crystallize-cache-index"
INDEX_NAMESPACE = "crystallize"
#: The default bound of what the index keeps: 2 GiB.
DEFAULT_TIER_BYTES = 2 << 30
_LEASE_ENV = "CRYSTALLIZE_CACHE_LEASE_SECONDS"
_CALL_TIMEOUT = 60.0


def share_outputs(job: Any, setting: bool | int) -> Any:
    """A shallow copy of ``job`` whose cache store has the in-cluster tier inserted.

    Args:
        job: the experiment as :func:`crystallize.backend.resolve_cache` returned it.
        setting: ``True`` for :data:`DEFAULT_TIER_BYTES`, or the bound in bytes.

    Returns:
        The copy (``job`` itself when nothing is cached).
    """
    import copy

    store = job.cache
    if store is None or store is False or store is True:
        return job
    if not any(step.cacheable for step in job.pipeline.steps):
        return job
    limit = DEFAULT_TIER_BYTES if setting is True else int(setting)
    scope = repr(store)

    def make(durable: Any) -> ObjectStoreTier:
        return ObjectStoreTier(durable, scope=scope, max_bytes=limit)

    insert = getattr(store, "with_shared_tier", None)
    shared = copy.copy(job)
    shared.cache = insert(make) if callable(insert) else make(store)
    return shared


class ObjectStoreTier:
    """A cache store that keeps objects in Ray's object store, in front of ``durable``.

    Args:
        durable: the store behind it, or ``None`` when the tier is read after a
            durable local directory (then the tier alone answers for other nodes).
        scope: names the durable store, so jobs with different stores never mix.
        max_bytes: what the index keeps at most (fixed by whoever starts it first).
        index_name: the index actor's name (in Ray namespace ``crystallize``).

    Example:
        >>> from crystallize import LocalCacheStore
        >>> tier = ObjectStoreTier(LocalCacheStore("/tmp/c"), scope="doc", max_bytes=1 << 30)
        >>> tier  # doctest: +ELLIPSIS
        ObjectStoreTier(LocalCacheStore('/tmp/c'))
    """

    def __init__(
        self, durable: Any, *, scope: str, max_bytes: int = DEFAULT_TIER_BYTES, index_name: str = INDEX_NAME
    ) -> None:
        self.durable = durable
        self.scope = scope
        self.max_bytes = max_bytes
        self.index_name = index_name
        self._index: Any = None
        self._off = False

    def __getstate__(self) -> dict[str, Any]:
        return {
            "durable": self.durable,
            "scope": self.scope,
            "max_bytes": self.max_bytes,
            "index_name": self.index_name,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._index, self._off = None, False

    # -- the store interface -------------------------------------------------------
    def get(self, namespace: str, key: str) -> bytes | None:
        found = self._lookup(namespace, key)
        if found is not None or self.durable is None:
            return found
        blob = self.durable.get(namespace, key)
        if blob is not None:
            self._publish(namespace, key, blob, only_new=False)  # the next node reads it here
        return blob

    def get_fresh(self, namespace: str, key: str) -> bytes | None:
        if self.durable is None:
            return self._lookup(namespace, key)
        fresh = getattr(self.durable, "get_fresh", None) or self.durable.get
        return fresh(namespace, key)

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        if self.durable is not None:
            self.durable.put(namespace, key, blob)
        self._publish(namespace, key, blob, only_new=False)

    def put_new(self, namespace: str, key: str, blob: bytes) -> bool:
        if self.durable is None:
            stored = self._publish(namespace, key, blob, only_new=True)
            return True if stored is None else stored
        create = getattr(self.durable, "put_new", None)
        if create is None:
            self.durable.put(namespace, key, blob)
            stored = True
        else:
            stored = create(namespace, key, blob)
        if stored:
            self._publish(namespace, key, blob, only_new=False)
        return stored

    def contains(self, namespace: str, key: str) -> bool:
        if self.durable is not None:
            return self.durable.contains(namespace, key)
        return self._call("has", self._name(namespace, key), default=False)

    def delete(self, namespace: str, key: str) -> None:
        if self.durable is not None:
            self.durable.delete(namespace, key)
        self._call("forget", self._name(namespace, key), default=None)

    def lease_scopes(self, namespace: str, key: str) -> list[Any]:
        """The cluster's lease (held by the index actor), then the durable store's."""
        scopes: list[Any] = [] if self._handle() is None else [_RayLease(self, self._name(namespace, key))]
        durable = getattr(self.durable, "lease_scopes", None)
        return scopes + (durable(namespace, key) if durable else [])

    def walk(self) -> Any:
        walk = getattr(self.durable, "walk", None)
        if walk is None:
            raise TypeError(f"{self!r} cannot list its objects.")
        return walk()

    def __repr__(self) -> str:
        return f"ObjectStoreTier({self.durable!r})"

    # -- the index -----------------------------------------------------------------
    def _name(self, namespace: str, key: str) -> str:
        return f"{self.scope}|{namespace}/{key}"

    def _lookup(self, namespace: str, key: str) -> bytes | None:
        found = self._call("get", self._name(namespace, key), default=None)
        if found is None:
            return None
        kind, value = found
        if kind == "bytes":
            return value
        import ray

        try:
            return ray.get(value[0], timeout=_CALL_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            # Lost with its node, or freed with a dead owner: the durable store has it.
            log.debug(
                "Object-store copy of %s/%s is gone (%s); reading the durable store.",
                namespace,
                key,
                type(exc).__name__,
            )
            self._call("forget", self._name(namespace, key), default=None)
            return None

    def _publish(self, namespace: str, key: str, blob: bytes, *, only_new: bool) -> bool | None:
        return self._call("put", self._name(namespace, key), blob, only_new, default=None)

    def _handle(self) -> Any:
        if self._off:
            return None
        if self._index is None:
            try:
                self._index = _index_actor(self.index_name, self.max_bytes)
            except Exception as exc:
                self._step_aside(exc)
                return None
        return self._index

    def _call(self, method: str, *args: Any, default: Any) -> Any:
        index = self._handle()
        if index is None:
            return default
        import ray

        try:
            return ray.get(getattr(index, method).remote(*args), timeout=_CALL_TIMEOUT)
        except Exception as exc:
            self._step_aside(exc)
            return default

    def _step_aside(self, exc: BaseException) -> None:
        self._off = True
        _actors.clear()  # a later tier in this process looks the index up (or starts it) afresh
        _warn_once(
            type(exc).__name__,
            "The in-cluster cache tier is unavailable in this process (%s: %s); the runs go "
            "on with the other cache tiers (said once per process).",
            type(exc).__name__,
            exc,
        )


class _RayLease:
    """Single flight across the cluster: a lease held by the index actor."""

    poll_seconds = 0.5
    max_poll_seconds = 5.0

    def __init__(self, tier: ObjectStoreTier, name: str) -> None:
        self.tier, self.name = tier, name
        self.token: str | None = None

    def acquire(self, cooperative: bool) -> bool:
        token = f"{_HOLDER}:{uuid.uuid4().hex[:8]}"
        taken = self.tier._call("acquire", self.name, token, _lease_seconds(), default=True)
        if taken:
            self.token = token
            _heartbeat.add(self)
        return bool(taken)

    def held(self) -> bool:
        return bool(self.tier._call("held", self.name, self.token, default=False))

    def wait(self, seconds: float) -> None:
        self.tier._call("wait", self.name, seconds, default=None)

    def renew(self) -> None:
        if self.token is not None:
            self.tier._call("renew", self.name, self.token, _lease_seconds(), default=None)

    def release(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            _heartbeat.discard(self)
            self.tier._call("release", self.name, token, default=None)

    def __repr__(self) -> str:
        return f"RayLease({self.name})"


_actors: dict[tuple[str, str], Any] = {}


def _index_actor(name: str, max_bytes: int) -> Any:
    """The cluster's index actor, started on first use (detached: it serves later jobs too)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised in this process")
    key = (ray.get_runtime_context().gcs_address, name)  # one handle per cluster and index
    handle = _actors.get(key)
    if handle is None:
        actor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(CacheIndex)  # type: ignore[call-overload]
        handle = actor.options(name=name, namespace=INDEX_NAMESPACE, get_if_exists=True, lifetime="detached").remote(
            max_bytes
        )
        _actors[key] = handle
    return handle


class _Heartbeat:
    """Renews this process's cluster leases every third of their lifetime; its thread
    exits half a second after the last lease is released."""

    def __init__(self) -> None:
        self.leases: set[_RayLease] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, lease: _RayLease) -> None:
        with self.lock:
            self.leases.add(lease)
            if self.thread is None:
                self.thread = threading.Thread(target=self._beat, name="crystallize-ray-leases", daemon=True)
                self.thread.start()
            else:
                self.wake.set()

    def discard(self, lease: _RayLease) -> None:
        with self.lock:
            self.leases.discard(lease)
            if not self.leases:
                self.wake.set()

    def _beat(self) -> None:
        due = time.monotonic() + _lease_seconds() / 3
        while True:
            with self.lock:
                idle = not self.leases
            woke = self.wake.wait(0.5 if idle else max(0.0, due - time.monotonic()))
            self.wake.clear()
            with self.lock:
                if not self.leases:
                    if not woke:
                        self.thread = None
                        return
                    continue
                leases = list(self.leases)
            if time.monotonic() >= due:
                due = time.monotonic() + _lease_seconds() / 3
                for lease in leases:
                    lease.renew()


_heartbeat = _Heartbeat()
_HOLDER = f"{socket.gethostname()}:{os.getpid()}"
_warned: set[str] = set()


def _warn_once(problem: str, message: str, *args: Any) -> None:
    if problem not in _warned:
        _warned.add(problem)
        log.warning(message, *args)


def _lease_seconds() -> float:
    try:
        return max(float(os.environ.get(_LEASE_ENV) or 60.0), 0.0)
    except ValueError:
        return 60.0
