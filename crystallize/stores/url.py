"""Stores at a URL (``s3://``, ``gs://``, ``az://``, ``memory://``...) through fsspec.

:class:`FsspecStore` keeps each object at ``<url>/<namespace>/<key>``; create-only
writes use fsspec's ``"xb"`` mode, which ``s3fs`` turns into a conditional PUT
(``If-None-Match: *``), so the first writer of a manifest wins. :class:`UrlStore` is
what users name: the remote read through a bounded local directory
(:class:`~crystallize.stores.tiered.ReadThroughStore`).

Credentials and endpoints come from the backend's usual configuration; for S3 that
is the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, profiles), so MinIO,
Garage or any S3-compatible store works. ``storage_options`` go to fsspec as they are.

Anything the storage library raises is reported as an ``OSError``
(:class:`ObjectStoreError` when it was not one), which the cache turns into one
warning and a run that goes on uncached.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .base import StoredObject
from .tiered import DEFAULT_LOCAL_BYTES, ReadThroughStore

__all__ = ["EXTRAS", "FsspecStore", "ObjectStoreError", "UrlStore", "install_hint"]

_T = TypeVar("_T")

#: The crystallize-lab extra that installs each protocol's fsspec backend.
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}
_NO_LOCAL_COPY = {"memory", "file", "local"}


class ObjectStoreError(OSError):
    """An object store failed with an error of its client library (the cause)."""


def install_hint(protocol: str) -> str:
    """The command that installs what a protocol needs.

    Example:
        >>> install_hint("s3")
        "pip install 'crystallize-lab[s3]'"
    """
    extra = EXTRAS.get(protocol)
    return (
        f"pip install 'crystallize-lab[{extra}]'" if extra else "pip install fsspec (and the package for this protocol)"
    )


class FsspecStore:
    """Objects at ``<url>/<namespace>/<key>`` on any fsspec filesystem.

    Args:
        url: e.g. ``"s3://bucket/prefix"`` or ``"memory://cache"``.
        storage_options: passed to the filesystem (e.g. ``{"endpoint_url": ...}``,
            ``{"anon": False, "key": ..., "secret": ...}`` for s3fs).

    Raises:
        ImportError: fsspec or the protocol's package is missing; the message names
            the extra to install.

    Example:
        >>> store = FsspecStore("memory://doc-example")
        >>> store.put_new("step", "input", b"entry"), store.put_new("step", "input", b"x")
        (True, False)
        >>> store.get("step", "input")
        b'entry'
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._pid = os.getpid()
        self._root = ""
        self._exclusive = True
        self._serial: bool | None = None
        self._connect()  # fail here, in the driver, if a package is missing

    def __getstate__(self) -> dict[str, Any]:  # the filesystem object is rebuilt where it is used
        return {"url": self.url, "protocol": self.protocol, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs, self._root, self._exclusive, self._pid, self._serial = None, "", True, os.getpid(), None

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (made on first use in each process; a forked child makes its own)."""
        return self._connect()

    def _connect(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            self._pid = os.getpid()
            try:
                import fsspec.core

                options = dict(self.storage_options)
                if self.protocol not in _NO_LOCAL_COPY:
                    # Every read must see the store as it is now, not a listing cached
                    # by this process (after `crystallize cache ls`, say).
                    options.setdefault("use_listings_cache", False)
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **options)
            except ImportError as exc:
                raise ImportError(
                    f"The cache store {self.url!r} needs fsspec and its {self.protocol!r} backend, "
                    f"which are not installed ({exc}): {install_hint(self.protocol)}"
                ) from exc
            self._root = self._root.rstrip("/")
        return self._fs

    def _path(self, namespace: str, key: str) -> str:
        self._connect()
        return f"{self._root}/{namespace}/{key}"

    def url_of(self, namespace: str, key: str) -> str:
        """The object's URL, for messages."""
        return f"{self.url}/{namespace}/{key}"

    def get(self, namespace: str, key: str) -> bytes | None:
        # Manifests are small: one GET, without the HEAD s3fs sends first to decide
        # whether to read a big object in parallel ranges (which blobs may want).
        options = {"max_concurrency": 1} if namespace != "blobs" and self._serial_reads() else {}

        def read() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(self._path(namespace, key), **options))
            except FileNotFoundError:
                return None

        return self._io(read)

    def _serial_reads(self) -> bool:
        if self._serial is None:
            try:
                self._serial = "max_concurrency" in inspect.signature(self.fs._cat_file).parameters
            except (AttributeError, TypeError, ValueError):
                self._serial = False
        return self._serial

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self._io(lambda: self.fs.pipe_file(self._path(namespace, key), blob))

    def put_new(self, namespace: str, key: str, blob: bytes) -> bool:
        """Create-only write (a conditional PUT on S3); ``False`` if the object exists."""
        path = self._path(namespace, key)

        def create() -> bool:
            if self._exclusive:
                try:
                    with self.fs.open(path, "xb") as fh:
                        fh.write(blob)
                    return True
                except FileExistsError:
                    return False
                except (ValueError, NotImplementedError):  # no "xb" here: check, then write
                    self._exclusive = False
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, blob)
            return True

        return self._io(create)

    def contains(self, namespace: str, key: str) -> bool:
        return self._io(lambda: bool(self.fs.exists(self._path(namespace, key))))

    def delete(self, namespace: str, key: str) -> None:
        def remove() -> None:
            try:
                self.fs.rm_file(self._path(namespace, key))
            except FileNotFoundError:
                pass

        self._io(remove)

    def lease_scopes(self, namespace: str, key: str) -> list[Any]:
        """A lease object beside the entry, written create-only: jobs sharing the store."""
        from .leases import StoreLease

        return [StoreLease(self, namespace, key, poll_seconds=0.05, max_poll_seconds=0.5)]

    def walk(self) -> Iterator[StoredObject]:
        """Every object under the URL (one listing; never on the hot path)."""
        found = self._io(lambda: self.fs.find(self._root, detail=True, withdirs=False))
        prefix = self._root + "/"
        for path, info in sorted(found.items()):
            path = path if path.startswith(prefix) else "/" + path.lstrip("/")
            parts = path[len(prefix) :].split("/") if path.startswith(prefix) else []
            if len(parts) != 2:
                continue  # not written by crystallize
            yield StoredObject(parts[0], parts[1], int(info.get("size") or 0), _modified(info))

    def _io(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (OSError, ImportError):
            raise
        except Exception as exc:  # botocore, aiohttp, google-auth...: the store failed
            raise ObjectStoreError(f"{type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"


class UrlStore(ReadThroughStore):
    """The step cache in an object store, by URL, read through a local directory.

    ``Experiment(cache="s3://bucket/prefix")`` and ``$CRYSTALLIZE_CACHE_URL`` make
    one of these; make it yourself to pass ``storage_options`` or size the local copy.

    Args:
        url: ``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``memory://...`` or
            any URL fsspec knows.
        storage_options: options for the filesystem, e.g.
            ``{"endpoint_url": "http://minio:9000", "key": ..., "secret": ...}`` for S3.
            Default: the backend's own configuration (the AWS environment for S3).
        local_dir: this machine's copy: ``None`` for ``$CRYSTALLIZE_CACHE_DIR`` or
            ``./.cache`` as resolved on each machine, a path, or ``False`` for none
            (the default for ``memory://``).
        local_max_bytes: the local copy's bound; least recently used objects go first.

    Raises:
        ImportError: the protocol's package is missing; the message gives the pip
            command (``pip install 'crystallize-lab[s3]'``).

    Example:
        >>> from crystallize import Experiment
        >>> store = UrlStore("s3://my-bucket/cache",  # doctest: +SKIP
        ...                  storage_options={"endpoint_url": "http://127.0.0.1:9000"})
        >>> exp = Experiment(datasource, pipeline, cache=store)  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        local_dir: str | os.PathLike[str] | bool | None = None,
        local_max_bytes: int = DEFAULT_LOCAL_BYTES,
    ) -> None:
        remote = FsspecStore(url, storage_options)
        if local_dir is None and remote.protocol in _NO_LOCAL_COPY:
            local_dir = False
        super().__init__(remote, local_dir, max_bytes=local_max_bytes)
        self.url = remote.url

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "url": self.url}

    def with_shared_tier(self, make: Callable[[Any], Any]) -> ReadThroughStore:
        return ReadThroughStore(make(self.remote), self.local_dir, max_bytes=self.max_bytes)

    def __repr__(self) -> str:
        return f"UrlStore({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlStore) and (other.url, other.local_dir) == (self.url, self.local_dir)

    def __hash__(self) -> int:
        return hash(self.url)


def _modified(info: dict[str, Any]) -> float:
    for name in ("LastModified", "mtime", "last_modified", "created", "creation_time"):
        value = info.get(name)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0
