"""LocalCacheStore: objects as files in a directory on a local or shared filesystem."""

from __future__ import annotations

import errno
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .base import CACHE_DIR_ENV, StoredObject

__all__ = ["LocalCacheStore"]

_SUFFIX = ".pkl"


class LocalCacheStore:
    """Objects as files ``<root>/<namespace>/<key>.pkl``.

    Writes go to a temporary file named with the host and pid, then are renamed into
    place (``put``) or hard-linked into place (``put_new``, which fails if the name
    exists), so concurrent writers of one key leave exactly one whole object and a
    reader never sees half of one. Leases are files beside the entry (see
    :mod:`crystallize.stores.leases`), so processes on one machine, or on machines
    sharing the filesystem, compute a missing entry once.

    Args:
        root: the cache directory; default ``$CRYSTALLIZE_CACHE_DIR`` or ``./.cache``,
            resolved to an absolute path when the store is made.

    Example:
        >>> import tempfile
        >>> store = LocalCacheStore(tempfile.mkdtemp())
        >>> store.put("step", "input", b"blob")
        >>> store.get("step", "input"), store.put_new("step", "input", b"other")
        (b'blob', False)
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        chosen = root if root is not None else os.environ.get(CACHE_DIR_ENV) or ".cache"
        self.root = Path(chosen).expanduser().absolute()

    def path(self, namespace: str, key: str) -> Path:
        """Where the object ``(namespace, key)`` lives."""
        return self.root / namespace / f"{key}{_SUFFIX}"

    def get(self, namespace: str, key: str) -> bytes | None:
        try:
            with open(self.path(namespace, key), "rb") as fh:
                return fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self._publish(namespace, key, blob, os.replace)

    def put_new(self, namespace: str, key: str, blob: bytes) -> bool:
        """Store ``blob`` only if nothing is stored yet; whether this call stored it."""
        taken = False

        def link(tmp: Path, final: Path) -> None:
            nonlocal taken
            try:
                os.link(tmp, final)
            except FileExistsError:
                if final.is_dir():  # not another writer's entry: a broken store
                    raise IsADirectoryError(errno.EISDIR, "Is a directory", str(final)) from None
                taken = True

        self._publish(namespace, key, blob, link)
        return not taken

    def contains(self, namespace: str, key: str) -> bool:
        return self.path(namespace, key).is_file()

    def delete(self, namespace: str, key: str) -> None:
        try:
            self.path(namespace, key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass

    def lease_scopes(self, namespace: str, key: str) -> list[Any]:
        """A lease file beside the entry: one process per machine (or shared filesystem)."""
        from .leases import StoreLease

        return [StoreLease(self, namespace, key, poll_seconds=0.005, max_poll_seconds=0.05)]

    def touch(self, namespace: str, key: str) -> None:
        """Mark the object as just used (its modification time), for eviction by age."""
        os.utime(self.path(namespace, key))

    def with_shared_tier(self, make: Callable[[Any], Any]) -> Any:
        """This directory read first, then ``make(None)`` (a tier that keeps objects itself)."""
        from .tiered import ReadThroughStore

        return ReadThroughStore(make(None), self, max_bytes=None)

    def walk(self) -> Iterator[StoredObject]:
        """Every object in the directory; hidden names (temporary files, locks) are not objects."""
        try:
            folders = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return
        for folder in folders:
            if folder.name.startswith(".") or not folder.is_dir(follow_symlinks=False):
                continue
            for item in _scan(folder.path):
                name = item.name
                if name.startswith("."):
                    continue
                key = name.removesuffix(_SUFFIX)
                try:
                    info = item.stat(follow_symlinks=False)
                except FileNotFoundError:  # evicted or deleted meanwhile
                    continue
                yield StoredObject(folder.name, key, info.st_size, info.st_mtime)

    def _publish(self, namespace: str, key: str, blob: bytes, place: Callable[[Path, Path], None]) -> None:
        final = self.path(namespace, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(blob)
            place(tmp, final)
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:  # renamed into place
                pass

    def __repr__(self) -> str:
        return f"LocalCacheStore({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalCacheStore) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)


def _scan(folder: str) -> list[os.DirEntry[str]]:
    try:
        return [item for item in os.scandir(folder) if item.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
