"""Cache stores: where cache entries live, behind one small bytes-in/bytes-out interface.

A store knows nothing about steps or pickles; it keeps opaque blobs under
``(namespace, key)``. Entry framing, checksums and lookups live in ``cache.py``, so a
new tier (object storage, a cluster-shared store) only implements these four methods.

Two wrappers implement the same interface around any store:

* :class:`GuardedStore` turns the store's ``OSError`` into a miss (or a skipped
  write) and one warning per store and problem, so a broken cache never costs a run;
* :class:`KeyedStore` carries the key entries are signed with, so a store resolved in
  a driver brings the driver's key to workers on other machines.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["CacheStore", "GuardedStore", "KeyedStore", "LocalCacheStore", "default_cache_store"]

log = logging.getLogger("crystallize.cache")
_T = TypeVar("_T")

CACHE_DIR_ENV = "CRYSTALLIZE_CACHE_DIR"


@runtime_checkable
class CacheStore(Protocol):
    """What the step cache needs from a place that keeps entries.

    ``namespace`` is a step hash and ``key`` an input hash (both hex, safe as path
    parts). ``put`` must be atomic: a reader sees the old blob, the new blob, or none.
    """

    def get(self, namespace: str, key: str) -> bytes | None:
        """The blob stored under ``(namespace, key)``, or ``None``."""

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        """Store ``blob``, replacing any previous one atomically."""

    def contains(self, namespace: str, key: str) -> bool:
        """Whether a blob is stored under ``(namespace, key)``."""

    def delete(self, namespace: str, key: str) -> None:
        """Remove the blob if present; no error when absent."""


class LocalCacheStore:
    """Entries as files ``<root>/<namespace>/<key>.pkl`` on a local or shared filesystem.

    Writes go to a temporary file named with the host and pid, then are renamed into
    place, so concurrent writers of one key leave exactly one whole entry.

    Args:
        root: the cache directory; default ``$CRYSTALLIZE_CACHE_DIR`` or ``./.cache``,
            resolved to an absolute path when the store is made.

    Example:
        >>> import tempfile
        >>> store = LocalCacheStore(tempfile.mkdtemp())
        >>> store.put("step", "input", b"blob")
        >>> store.get("step", "input")
        b'blob'
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        chosen = root if root is not None else os.environ.get(CACHE_DIR_ENV) or ".cache"
        self.root = Path(chosen).expanduser().absolute()

    def path(self, namespace: str, key: str) -> Path:
        """Where the entry for ``(namespace, key)`` lives."""
        return self.root / namespace / f"{key}.pkl"

    def get(self, namespace: str, key: str) -> bytes | None:
        try:
            return self.path(namespace, key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        final = self.path(namespace, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(
            f".{final.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        )
        try:
            with open(tmp, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def contains(self, namespace: str, key: str) -> bool:
        return self.path(namespace, key).is_file()

    def delete(self, namespace: str, key: str) -> None:
        self.path(namespace, key).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"LocalCacheStore({str(self.root)!r})"


def default_cache_store() -> LocalCacheStore:
    """The store used when none is given: ``$CRYSTALLIZE_CACHE_DIR`` or ``./.cache``."""
    return LocalCacheStore()


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

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self._call("put", namespace, key, None, lambda ns, k: self.store.put(ns, k, blob))

    def contains(self, namespace: str, key: str) -> bool:
        return self._call("contains", namespace, key, False, self.store.contains)

    def delete(self, namespace: str, key: str) -> None:
        self._call("delete", namespace, key, None, self.store.delete)

    def disable(self, problem: Exception) -> None:
        """Skip every later operation (failed) after warning once about ``problem``.

        For a problem outside the store that makes it unusable, such as a cache key
        that cannot be read.
        """
        self._disabled = True
        _warn_once((type(problem).__name__, str(problem)), "%s The runs go on uncached.", problem)

    def where(self, namespace: str, key: str) -> str:
        """Where the entry lives, for messages: a file path if the store has one."""
        path = getattr(self.store, "path", None)
        return str(path(namespace, key)) if callable(path) else f"{namespace}/{key} in {self.store!r}"

    def _call(self, op: str, namespace: str, key: str, default: _T, fn: Callable[[str, str], _T]) -> _T:
        if self._disabled:
            self.failed = True
            return default
        try:
            return fn(namespace, key)
        except OSError as exc:
            self.failed = True
            _warn_once(
                (repr(self.store), op, type(exc).__name__, exc.errno),
                "Cache store %r could not %s entry %s (%s: %s); the cache steps aside and "
                "the runs go on (said once per process for this store and problem). Check "
                "that the cache location is a directory you can write, or choose another "
                "with $%s or Experiment(cache=...).",
                self.store, op, self.where(namespace, key), type(exc).__name__, exc, CACHE_DIR_ENV,
            )
            return default

    def __repr__(self) -> str:
        return f"GuardedStore({self.store!r})"


class KeyedStore:
    """A :class:`CacheStore` that carries the key its entries are signed with.

    :func:`crystallize.backend.resolve_cache` wraps the store in one holding the
    driver's key, so a worker on another machine (another per-user key file) reads and
    writes entries the driver's machines can verify. The key travels with the pickled
    experiment: whoever can read that can forge entries.

    Args:
        store: the store to carry the key with.
        key: the MAC key (see :mod:`crystallize.signing`).

    Example:
        >>> import tempfile
        >>> store = KeyedStore(LocalCacheStore(tempfile.mkdtemp()), b"k" * 32)
        >>> store.put("step", "input", b"blob")
        >>> store.get("step", "input")
        b'blob'
    """

    def __init__(self, store: CacheStore, key: bytes) -> None:
        self.store = store
        self.key = key

    def get(self, namespace: str, key: str) -> bytes | None:
        return self.store.get(namespace, key)

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self.store.put(namespace, key, blob)

    def contains(self, namespace: str, key: str) -> bool:
        return self.store.contains(namespace, key)

    def delete(self, namespace: str, key: str) -> None:
        self.store.delete(namespace, key)

    def __repr__(self) -> str:  # never the key
        return f"KeyedStore({self.store!r})"


_warned: set[tuple[Any, ...]] = set()
_warned_lock = threading.Lock()


def _warn_once(problem: tuple[Any, ...], message: str, *args: Any) -> None:
    with _warned_lock:
        if problem in _warned:
            return
        _warned.add(problem)
    log.warning(message, *args)
