"""The store interface, and the two wrappers every store is used through.

A store keeps opaque blobs under ``(namespace, key)``; entry framing, signatures and
lookups live in :mod:`crystallize.cache`. Four methods make a store
(:class:`CacheStore`). A store may also offer optional capabilities, which callers
ask for with :func:`capability` rather than by checking types:

=================================  ===================================================
``put_new(ns, key, blob) -> bool``  create-only write; ``False`` if the object exists
                                    (the first writer wins)
``get_fresh(ns, key)``              read past any caching tier (small records that
                                    change: the read-key index, miss explanations)
``lease_scopes(ns, key)``           single-flight leases beyond this process, nearest
                                    first (see :mod:`crystallize.stores.leases`)
``walk()``                          every stored object, for ``crystallize cache``
                                    (never on the hot path)
``with_shared_tier(make)``          a copy with ``make(slow part)`` between this
                                    machine's disk and the durable store (the Ray tier)
``signing_key``                     the key entries are signed with (a driver's key)
=================================  ===================================================

* :class:`GuardedStore` turns the store's ``OSError`` into a miss (or a skipped
  write) and one warning per store and problem, so a broken cache never costs a run;
* :class:`KeyedStore` carries the key entries are signed with, so a store resolved in
  a driver brings the driver's key to workers on other machines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from ._warn import warn_once
from .leases import GuardedLease

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_URL_ENV",
    "CacheStore",
    "GuardedStore",
    "KeyedStore",
    "StoredObject",
    "capability",
    "warn_once",
]

log = logging.getLogger("crystallize.cache")
_T = TypeVar("_T")

CACHE_DIR_ENV = "CRYSTALLIZE_CACHE_DIR"
CACHE_URL_ENV = "CRYSTALLIZE_CACHE_URL"


@runtime_checkable
class CacheStore(Protocol):
    """What the step cache needs from a place that keeps entries.

    ``namespace`` is a step hash (or ``"blobs"``) and ``key`` an input hash, both
    safe as path parts. ``put`` must be atomic: a reader sees the old blob, the new
    blob, or none. Optional capabilities are listed in :mod:`crystallize.stores.base`.
    """

    def get(self, namespace: str, key: str) -> bytes | None:
        """The blob stored under ``(namespace, key)``, or ``None``."""

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        """Store ``blob``, replacing any previous one atomically."""

    def contains(self, namespace: str, key: str) -> bool:
        """Whether a blob is stored under ``(namespace, key)``."""

    def delete(self, namespace: str, key: str) -> None:
        """Remove the blob if present; no error when absent."""


class StoredObject(NamedTuple):
    """One object a store holds, as :meth:`walk` lists it."""

    namespace: str
    key: str
    size: int
    modified: float


def capability(store: Any, name: str) -> Any:
    """The store's optional capability ``name`` (a bound method or value), or ``None``.

    Example:
        >>> capability(object(), "put_new") is None
        True
    """
    return getattr(store, name, None)


class GuardedStore:
    """A :class:`CacheStore` whose ``OSError`` costs a warning, never a run.

    ``get`` answers ``None`` (a miss), ``put`` and ``delete`` do nothing and
    ``contains`` answers ``False``; :attr:`failed` turns ``True`` so the caller can
    record it. Each problem — (store, operation, exception type and errno) — is logged
    once per process, however many runs and threads meet it.

    Args:
        store: the store to guard.

    Example:
        >>> import tempfile
        >>> from crystallize.stores import LocalCacheStore
        >>> root = tempfile.mkdtemp()
        >>> open(f"{root}/ns", "w").close()  # a file where a directory should be
        >>> store = GuardedStore(LocalCacheStore(root))
        >>> store.put("ns", "key", b"blob")  # logs one warning
        >>> store.get("ns", "key"), store.failed
        (None, True)
    """

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        #: Whether an operation failed (or was skipped by :meth:`disable`).
        self.failed = False
        self._disabled = False

    def get(self, namespace: str, key: str) -> bytes | None:
        return self._call("get", namespace, key, None, self.store.get)

    def get_fresh(self, namespace: str, key: str) -> bytes | None:
        fresh = capability(self.store, "get_fresh") or self.store.get
        return self._call("get", namespace, key, None, fresh)

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self._call("put", namespace, key, None, lambda ns, k: self.store.put(ns, k, blob))

    def put_new(self, namespace: str, key: str, blob: bytes) -> bool:
        """Create-only where the store can; else a plain put. ``True`` on a failure too
        (there is nothing more the caller can do about this object)."""
        create = capability(self.store, "put_new")
        if create is None:
            self.put(namespace, key, blob)
            return True
        return self._call("put", namespace, key, True, lambda ns, k: create(ns, k, blob))

    def contains(self, namespace: str, key: str) -> bool:
        return self._call("contains", namespace, key, False, self.store.contains)

    def delete(self, namespace: str, key: str) -> None:
        self._call("delete", namespace, key, None, self.store.delete)

    def lease_scopes(self, namespace: str, key: str) -> list[Any]:
        """The store's leases, each guarded: a lease that fails lets the run compute."""
        scopes = capability(self.store, "lease_scopes")
        if scopes is None or self._disabled:
            return []
        return [GuardedLease(scope, self.store) for scope in scopes(namespace, key)]

    def disable(self, problem: Exception) -> None:
        """Skip every later operation (failed) after warning once about ``problem``.

        For a problem outside the store that makes it unusable, such as a cache key
        that cannot be read.
        """
        self._disabled = True
        warn_once((type(problem).__name__, str(problem)), "%s The runs go on uncached.", problem)

    def where(self, namespace: str, key: str) -> str:
        """Where the entry lives, for messages: a file path or URL if the store has one."""
        for name in ("path", "url_of"):
            locate = capability(self.store, name)
            if callable(locate):
                return str(locate(namespace, key))
        return f"{namespace}/{key} in {self.store!r}"

    def call(self, op: str, namespace: str, key: str, default: _T, fn: Callable[[str, str], _T]) -> _T:
        """Run ``fn(namespace, key)``; on ``OSError`` warn once, set :attr:`failed`, return ``default``."""
        return self._call(op, namespace, key, default, fn)

    def _call(self, op: str, namespace: str, key: str, default: _T, fn: Callable[[str, str], _T]) -> _T:
        if self._disabled:
            self.failed = True
            return default
        try:
            return fn(namespace, key)
        except OSError as exc:
            self.failed = True
            warn_once(
                (repr(self.store), op, type(exc).__name__, exc.errno),
                "Cache store %r could not %s entry %s (%s: %s); the cache steps aside and "
                "the runs go on (said once per process for this store and problem). Check "
                "that the cache location is a directory you can write (or a bucket you can "
                "reach), or choose another with $%s, $%s or Experiment(cache=...).",
                self.store,
                op,
                self.where(namespace, key),
                type(exc).__name__,
                exc,
                CACHE_DIR_ENV,
                CACHE_URL_ENV,
            )
            return default

    def __repr__(self) -> str:
        return f"GuardedStore({self.store!r})"


class KeyedStore:
    """A :class:`CacheStore` that carries the key its entries are signed with.

    :func:`crystallize.backend.resolve_cache` wraps the store in one holding the
    driver's key, so a worker on another machine (another per-user key file) reads and
    writes entries the driver's machines can verify. The key travels with the pickled
    experiment: whoever can read that can forge entries. Every capability of the
    wrapped store is passed through.

    Args:
        store: the store to carry the key with.
        key: the MAC key (see :mod:`crystallize.signing`).

    Example:
        >>> import tempfile
        >>> from crystallize.stores import LocalCacheStore
        >>> store = KeyedStore(LocalCacheStore(tempfile.mkdtemp()), b"k" * 32)
        >>> store.put("step", "input", b"blob")
        >>> store.get("step", "input")
        b'blob'
    """

    def __init__(self, store: CacheStore, key: bytes) -> None:
        self.store = store
        self.key = key

    @property
    def signing_key(self) -> bytes:
        """The key entries in this store are signed and verified with."""
        return self.key

    def get(self, namespace: str, key: str) -> bytes | None:
        return self.store.get(namespace, key)

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self.store.put(namespace, key, blob)

    def contains(self, namespace: str, key: str) -> bool:
        return self.store.contains(namespace, key)

    def delete(self, namespace: str, key: str) -> None:
        self.store.delete(namespace, key)

    def with_shared_tier(self, make: Callable[[Any], Any]) -> KeyedStore:
        """This store, keyed alike, with a shared tier inserted (see the module doc)."""
        insert = capability(self.store, "with_shared_tier")
        return KeyedStore(insert(make) if insert else make(self.store), self.key)

    def __getattr__(self, name: str) -> Any:
        # Optional capabilities (put_new, get_fresh, lease_scopes, walk, path...) are
        # the wrapped store's; asking for one it lacks raises AttributeError as usual.
        if name.startswith("__") or name in ("store", "key"):
            raise AttributeError(name)
        return getattr(self.store, name)

    def __repr__(self) -> str:  # never the key
        return f"KeyedStore({self.store!r})"


def walk_all(store: Any) -> Iterator[StoredObject]:
    """Every object ``store`` holds, if it can list them.

    Raises:
        TypeError: the store cannot list its objects (it has no ``walk``).
    """
    walk = capability(store, "walk")
    if walk is None:
        raise TypeError(f"{store!r} cannot list its objects (it has no walk() method).")
    return walk()
