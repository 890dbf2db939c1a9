"""ReadThroughStore: a remote store read through this machine's disk.

A node reads a remote object once, then from its local directory; writes go to the
remote first, then to the local copy. The local directory is bounded in bytes and
evicts the least recently used objects (a hit refreshes the file's modification
time, at most once a minute). When several processes of one machine miss the same object, one downloads
it while the others wait on a file lock and then read the local copy.

Small signed records that change (the read-key index, miss explanations) are read
past the local copy (``get_fresh``), so a node never acts on a stale one.

A local directory that fails (full, read-only) costs one warning and steps aside:
reads and writes go to the remote alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .base import CacheStore, StoredObject, capability, warn_once
from .local import LocalCacheStore

try:
    import fcntl
except ImportError:  # Windows: downloads are not serialised across processes
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_LOCAL_BYTES", "ReadThroughStore"]

#: The default bound of a read-through directory: 10 GiB.
DEFAULT_LOCAL_BYTES = 10 << 30
_LOCK_STRIPES = 64
_TOUCH_EVERY = 60.0
# Bytes this process stored in each local directory since it last measured it: the
# directory is listed (to evict) once it may have grown by a tenth of its bound.
_added: dict[Path, int] = {}
_added_lock = threading.Lock()
_LEASE = ".lease"


class ReadThroughStore:
    """A store in front of which this machine keeps a bounded local copy.

    Args:
        remote: the durable store (e.g. a bucket: :class:`~crystallize.UrlStore`
            builds one of these for you).
        local: the local directory: a path, a :class:`~crystallize.LocalCacheStore`,
            ``None`` for ``$CRYSTALLIZE_CACHE_DIR`` or ``./.cache`` *as resolved in the
            process that reads* (so each node of a cluster uses its own disk), or
            ``False`` for no local copy.
        max_bytes: the local directory's bound; ``None`` when the local directory is
            itself durable (a cache directory with a shared tier behind it): no bound,
            and it answers ``contains`` and fresh reads the remote cannot.

    Example:
        >>> import tempfile
        >>> from crystallize.stores import LocalCacheStore
        >>> remote = LocalCacheStore(tempfile.mkdtemp())  # stands for a bucket here
        >>> remote.put("step", "input", b"entry")
        >>> tiered = ReadThroughStore(remote, tempfile.mkdtemp())
        >>> tiered.get("step", "input"), tiered.local.get("step", "input")
        (b'entry', b'entry')
    """

    def __init__(
        self,
        remote: CacheStore,
        local: str | os.PathLike[str] | LocalCacheStore | bool | None = None,
        *,
        max_bytes: int | None = DEFAULT_LOCAL_BYTES,
    ) -> None:
        if local is True:
            local = None
        self.remote = remote
        self.local_dir: Path | bool | None = (
            local.root
            if isinstance(local, LocalCacheStore)
            else None
            if local is None
            else False
            if local is False
            else Path(local).expanduser().absolute()
        )
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self) -> None:
        self._local: LocalCacheStore | None = None
        self._touched: dict[tuple[str, str], float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"remote": self.remote, "local_dir": self.local_dir, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def local(self) -> LocalCacheStore | None:
        """The local directory's store in this process (``None`` when there is none)."""
        if self._local is None and self.local_dir is not False:
            self._local = LocalCacheStore(self.local_dir if isinstance(self.local_dir, Path) else None)
        return self._local

    # -- the store interface -------------------------------------------------------
    def get(self, namespace: str, key: str) -> bytes | None:
        local = self.local
        if local is None:
            return self.remote.get(namespace, key)
        blob = self._local_op("read", local.get, namespace, key)
        if blob is not None:
            self._touch(local, namespace, key)
            return blob
        with self._download_lock(local, namespace, key):
            blob = self._local_op("read", local.get, namespace, key)  # fetched by a neighbour
            if blob is None:
                blob = self.remote.get(namespace, key)
                if blob is not None:
                    self._keep(local, namespace, key, blob)
        return blob

    def get_fresh(self, namespace: str, key: str) -> bytes | None:
        """Read the remote's copy (for objects that change); a durable local directory's
        when the remote has none."""
        fresh = capability(self.remote, "get_fresh") or self.remote.get
        found = fresh(namespace, key)
        if found is None and self.max_bytes is None and self.local is not None:
            found = self._local_op("read", self.local.get, namespace, key)
        return found

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self.remote.put(namespace, key, blob)
        if self.local is not None:
            self._keep(self.local, namespace, key, blob)

    def put_new(self, namespace: str, key: str, blob: bytes) -> bool:
        create = capability(self.remote, "put_new")
        if create is None:
            self.remote.put(namespace, key, blob)
            stored = True
        else:
            stored = create(namespace, key, blob)
        if stored and self.local is not None:  # another writer's object is read when needed
            self._keep(self.local, namespace, key, blob)
        return stored

    def contains(self, namespace: str, key: str) -> bool:
        """Whether the remote holds the object (a bounded local copy may outlive the
        remote's; a durable local directory counts)."""
        if self.max_bytes is None and self.local is not None and self.local.contains(namespace, key):
            return True
        return self.remote.contains(namespace, key)

    def delete(self, namespace: str, key: str) -> None:
        self.remote.delete(namespace, key)
        if self.local is not None:
            self._local_op("delete", self.local.delete, namespace, key)

    # -- capabilities --------------------------------------------------------------
    def lease_scopes(self, namespace: str, key: str) -> list[Any]:
        """This machine's lease file first, then the remote's leases."""
        scopes = [] if self.local is None else self.local.lease_scopes(namespace, key)
        remote = capability(self.remote, "lease_scopes")
        return scopes + (remote(namespace, key) if remote else [])

    def walk(self) -> Iterator[StoredObject]:
        """The remote's objects (the local directory is only a copy)."""
        walk = capability(self.remote, "walk")
        if walk is None:
            raise TypeError(f"{self.remote!r} cannot list its objects.")
        return walk()

    def with_shared_tier(self, make: Callable[[Any], Any]) -> ReadThroughStore:
        """A copy with ``make(remote)`` between the local directory and the remote."""
        return ReadThroughStore(make(self.remote), self.local_dir, max_bytes=self.max_bytes)

    def url_of(self, namespace: str, key: str) -> str:
        locate = capability(self.remote, "url_of") or capability(self.remote, "path")
        return str(locate(namespace, key)) if locate else f"{namespace}/{key} in {self.remote!r}"

    # -- the local copy ------------------------------------------------------------
    def _touch(self, local: LocalCacheStore, namespace: str, key: str) -> None:
        """Mark a local object as used, at most once a minute per object and process.

        Eviction only needs to know roughly what was used last; a file-time write on
        every hit would cost a tenth of a small hit.
        """
        now = time.monotonic()
        if now - self._touched.get((namespace, key), -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[(namespace, key)] = now
        self._local_op("read", local.touch, namespace, key)

    def _keep(self, local: LocalCacheStore, namespace: str, key: str, blob: bytes) -> None:
        self._local_op("write", local.put, namespace, key, blob)
        if self.max_bytes is None:
            return
        with _added_lock:  # per directory, for every store object of this process
            added = _added.get(local.root)
            due = added is None or added + len(blob) > self.max_bytes // 10
            _added[local.root] = 0 if due else added + len(blob)  # type: ignore[operator]
        if due:
            self._local_op("evict", lambda ns, k: self._evict(local), namespace, key)

    def _evict(self, local: LocalCacheStore) -> None:
        """Delete the least recently used objects until the directory fits in 90 % of its bound."""
        objects = [o for o in local.walk() if not o.key.endswith(_LEASE)]
        total = sum(o.size for o in objects)
        if self.max_bytes is None or total <= self.max_bytes:
            return
        for obj in sorted(objects, key=lambda o: o.modified):
            if total <= self.max_bytes * 0.9:
                break
            local.delete(obj.namespace, obj.key)
            total -= obj.size

    @contextlib.contextmanager
    def _download_lock(self, local: LocalCacheStore, namespace: str, key: str) -> Iterator[None]:
        """One download per object per machine: an exclusive lock on one of a few files."""
        if fcntl is None:
            yield
            return
        stripe = zlib.crc32(f"{namespace}/{key}".encode()) % _LOCK_STRIPES  # the same in every process
        lock = local.root / ".locks" / f"{stripe:02d}"
        with contextlib.ExitStack() as stack:
            try:
                lock.parent.mkdir(parents=True, exist_ok=True)
                fh = stack.enter_context(open(lock, "a+b"))
                fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed
            except OSError:
                pass  # the local directory is failing: _local_op warns; download anyway
            yield

    def _local_op(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            warn_once(
                (repr(self), "local", what, type(exc).__name__, exc.errno),
                "The local copy %s of cache store %r could not %s an object (%s: %s); it "
                "steps aside and the remote store is used directly (said once per process).",
                self.local,
                self.remote,
                what,
                type(exc).__name__,
                exc,
            )
            return None

    def __repr__(self) -> str:
        where = "no local copy" if self.local_dir is False else str(self.local_dir or "$CRYSTALLIZE_CACHE_DIR")
        return f"ReadThroughStore({self.remote!r}, local={where!r})"
