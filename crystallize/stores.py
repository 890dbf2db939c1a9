"""Cache stores: where cache entries live, behind one small bytes-in/bytes-out interface.

A store knows nothing about steps or pickles; it keeps opaque blobs under
``(namespace, key)``. Entry framing, checksums and lookups live in ``cache.py``, so a
new tier (object storage, a cluster-shared store) only implements these four methods.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["CacheStore", "LocalCacheStore", "default_cache_store"]

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
