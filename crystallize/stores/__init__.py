"""Cache stores: where cache entries live, behind one small bytes-in/bytes-out interface.

=========================  ===============================================================
``base.py``                the :class:`CacheStore` interface, its optional capabilities,
                           :class:`GuardedStore` (errors cost a warning, never a run) and
                           :class:`KeyedStore` (carries the driver's signing key)
``local.py``               :class:`LocalCacheStore`: a directory
``url.py``                 :class:`UrlStore`: ``s3://``, ``gs://``, ``az://``... through
                           fsspec, read through a local directory
``tiered.py``              :class:`ReadThroughStore`: any store read through a bounded
                           local directory (least recently used objects evicted)
``flight.py``              single flight: one run computes a missing entry, others wait
``leases.py``              leases on a store (a file or object beside the entry)
=========================  ===============================================================

:func:`open_store` turns what a user wrote (``"s3://bucket/prefix"``, a path, nothing)
into a store; it is how ``Experiment(cache=...)``, ``$CRYSTALLIZE_CACHE_URL`` and
``crystallize cache --cache`` are resolved, everywhere alike.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .base import (
    CACHE_DIR_ENV,
    CACHE_URL_ENV,
    CacheStore,
    GuardedStore,
    KeyedStore,
    StoredObject,
    capability,
)
from .local import LocalCacheStore
from .tiered import DEFAULT_LOCAL_BYTES, ReadThroughStore
from .url import FsspecStore, ObjectStoreError, UrlStore

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_URL_ENV",
    "LOCAL_MAX_ENV",
    "CacheStore",
    "FsspecStore",
    "GuardedStore",
    "KeyedStore",
    "LocalCacheStore",
    "ObjectStoreError",
    "ReadThroughStore",
    "StoredObject",
    "UrlStore",
    "capability",
    "default_cache_store",
    "open_store",
    "parse_size",
]

#: The bound of the local copy of a store given by URL, e.g. ``20G`` (default 10 GiB).
LOCAL_MAX_ENV = "CRYSTALLIZE_CACHE_LOCAL_MAX"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def open_store(spec: Any = None, *, storage_options: dict[str, Any] | None = None) -> CacheStore:
    """The store that ``spec`` names.

    Args:
        spec: ``None`` for the default (``$CRYSTALLIZE_CACHE_URL``, else
            ``$CRYSTALLIZE_CACHE_DIR``, else ``./.cache``); a URL (``s3://``, ``gs://``,
            ``az://``, ``memory://``; ``file://`` is a directory); a path; or a store,
            returned as it is.
        storage_options: for a URL, options for its filesystem.

    Returns:
        A :class:`LocalCacheStore` for a directory, a :class:`UrlStore` for a URL.

    Raises:
        ImportError: a URL whose package is missing (the message names the extra).
        ValueError: ``$CRYSTALLIZE_CACHE_LOCAL_MAX`` is not a size.

    Example:
        >>> open_store("/tmp/my-cache")
        LocalCacheStore('/tmp/my-cache')
        >>> open_store("memory://doc-cache")
        UrlStore('memory://doc-cache')
    """
    if spec is None:
        spec = os.environ.get(CACHE_URL_ENV) or None
        if spec is None:
            return LocalCacheStore()
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = os.fspath(spec)
    if "://" not in text:
        return LocalCacheStore(text)
    protocol, rest = text.split("://", 1)
    if protocol in ("file", "local"):
        return LocalCacheStore(rest)
    limit = os.environ.get(LOCAL_MAX_ENV)
    return UrlStore(text, storage_options, local_max_bytes=parse_size(limit) if limit else DEFAULT_LOCAL_BYTES)


def default_cache_store() -> CacheStore:
    """The store used when none is given: ``$CRYSTALLIZE_CACHE_URL``, ``$CRYSTALLIZE_CACHE_DIR`` or ``./.cache``."""
    return open_store(None)


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"10G"``, ``"512M"``, ``"1.5T"`` or ``"4096"`` (powers of 1024).

    Raises:
        ValueError: not a size.

    Example:
        >>> parse_size("10G"), parse_size("512k"), parse_size(100)
        (10737418240, 524288, 100)
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 10G, 512M or 4096.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
