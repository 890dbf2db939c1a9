"""The step cache: entry framing, checksums, lookups that check ctx reads, and replay.

An entry holds a step's output *and* what the step did to its context (metrics,
added keys, artifacts), plus the digest of every ctx value the step read. A lookup
only hits when those values are unchanged in the current context, so a treatment
that changes a value a step read can never be served another condition's output.

Where entries go, for a step hash ``S`` and an input hash ``I``:

* ``S/I`` (the primary entry), written by the first run that stores ``(S, I)``;
* ``S/I.<reads-digest>`` (a variant), for runs whose ctx reads differ from the
  primary's. The variant's name is derived from the primary's read keys and the
  current values, so a lookup costs at most two reads.

Blobs are ``MAGIC | MAC(body) | body``, the MAC keyed with this user's (or the
driver's) cache key (see :mod:`crystallize.signing`). A body is unpickled only after
its MAC verifies; a blob that fails, or does not unpickle, is a miss, is deleted, and
is rewritten by the run that missed. The store is wrapped in a
:class:`~crystallize.stores.GuardedStore`: its ``OSError`` costs a warning, not a run.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from .context import _MISSING, FrozenContext, _Unhashable
from .hashing import hash_struct, hash_value
from .signing import MAC_SIZE, CacheKeyError, cache_key, sign, verify
from .stores import CacheStore, GuardedStore, KeyedStore

__all__ = ["CacheEntry", "StepCache", "decode_entry", "encode_entry", "read_digests", "value_digest"]

log = logging.getLogger("crystallize.cache")

# The last byte is the frame version: 2 added a MAC (HMAC-SHA256), 3 made it GMAC;
# entries of older frames are misses and get rewritten.
MAGIC = b"CRYSTALLIZE-ENTRY\x03"
_ABSENT = "<absent>"


class CorruptEntryError(ValueError):
    """A blob is not a whole entry signed with this cache's key, or does not unpickle."""


@dataclass
class CacheEntry:
    """One cached step execution.

    Attributes:
        output: the data the step returned (metrics split off).
        metrics: ``(name, value)`` pairs the step recorded, in order.
        added: ``(key, value)`` pairs the step added to the context.
        reads: ctx key -> digest of the value the step saw (``<absent>`` if missing).
        artifacts: artifacts the step wrote, replayed on a hit.
    """

    output: Any
    metrics: list[tuple[str, Any]] = field(default_factory=list)
    added: list[tuple[str, Any]] = field(default_factory=list)
    reads: dict[str, str] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)


def encode_entry(entry: CacheEntry, key: bytes | None = None) -> bytes:
    """Pickle and sign an entry: ``MAGIC | MAC | body``.

    Args:
        entry: what to store.
        key: the MAC key; ``None`` for this process's :func:`~crystallize.signing.cache_key`.

    Raises:
        Exception: whatever pickling the entry raises.

    Example:
        >>> blob = encode_entry(CacheEntry(output=42), b"k" * 32)
        >>> decode_entry(blob, b"k" * 32).output
        42
    """
    body = cloudpickle.dumps(entry.__dict__, protocol=5)
    return MAGIC + sign(body, cache_key() if key is None else key) + body


def decode_entry(blob: bytes, key: bytes | None = None) -> CacheEntry:
    """Verify, then unpack, a blob made by :func:`encode_entry`.

    Args:
        blob: the stored bytes.
        key: the MAC key; ``None`` for this process's :func:`~crystallize.signing.cache_key`.

    Raises:
        CorruptEntryError: a wrong header, a MAC that does not verify under ``key``
            (damaged, forged, or signed with another key: the body is then never
            unpickled), or a verified body that does not unpickle here.
    """
    head = len(MAGIC)
    if len(blob) < head + MAC_SIZE or not blob.startswith(MAGIC):
        raise CorruptEntryError("bad header")
    view = memoryview(blob)
    mac, body = view[head : head + MAC_SIZE], view[head + MAC_SIZE :]
    if not verify(mac, body, cache_key() if key is None else key):
        raise CorruptEntryError("its MAC does not verify: damaged, forged, or signed with another cache key")
    try:
        return CacheEntry(**pickle.loads(body))
    except Exception as exc:  # signed by us, but by an incompatible version
        raise CorruptEntryError(f"unreadable body: {exc}") from exc


def value_digest(value: Any) -> str:
    """The digest a read of ``value`` is recorded and checked with."""
    return _ABSENT if value is _MISSING else hash_value(value)


def read_digests(reads: dict[Any, Any]) -> dict[Any, str]:
    """The recorded read digests; raises if a value the step read could not be hashed."""
    for key, digest in reads.items():
        if isinstance(digest, _Unhashable):
            raise TypeError(f"ctx value {key!r}: {digest.error}") from digest.error
    return dict(reads)


class StepCache:
    """Looks entries up in, and saves them to, a :class:`CacheStore`.

    Args:
        store: where the entries live. Its ``OSError`` never fails a run: it is
            warned about once and sets :attr:`failed`.
        key: the MAC key entries are signed with; default the key a
            :class:`~crystallize.stores.KeyedStore` carries, else
            :func:`~crystallize.signing.cache_key`. If that fails, the cache is off
            (one warning) and every step counts as ``failed``.

    Example:
        >>> import tempfile
        >>> from crystallize import LocalCacheStore
        >>> cache = StepCache(LocalCacheStore(tempfile.mkdtemp()))
        >>> cache.save("s", "i", CacheEntry(output=42))
        True
        >>> cache.lookup("s", "i", FrozenContext()).output
        42
    """

    def __init__(self, store: CacheStore, key: bytes | None = None) -> None:
        # A store resolved in a driver carries the driver's key, so entries written on
        # any node verify on every other (see crystallize.backend.resolve_cache).
        if isinstance(store, KeyedStore):
            key = store.key if key is None else key
            store = store.store
        # A fresh guard per StepCache (one per run): its `failed` flag is this run's.
        self.store = GuardedStore(store.store if isinstance(store, GuardedStore) else store)
        if key is None:
            try:
                key = cache_key()
            except CacheKeyError as exc:
                # Without a key nothing can be verified: the store is skipped, and the
                # throwaway key below only signs blobs that are never written.
                self.store.disable(exc)
                key = os.urandom(32)
        self.key = key

    @property
    def failed(self) -> bool:
        """Whether the store failed (an ``OSError``, warned about once) since last reset.

        The pipeline resets it before each cacheable step and records ``"error"`` in
        the step's provenance when it is set after the lookup and save.
        """
        return self.store.failed

    @failed.setter
    def failed(self, value: bool) -> None:
        self.store.failed = value


    def lookup(self, step_hash: str, input_hash: str, ctx: FrozenContext) -> CacheEntry | None:
        """The entry whose recorded reads match ``ctx``, or ``None`` (a miss)."""
        primary = self._load(step_hash, input_hash)
        if primary is None:
            return None
        if self._matches(primary, ctx):
            return primary
        variant_key = self._variant_key(input_hash, primary.reads.keys(), ctx)
        if variant_key is None:
            return None
        variant = self._load(step_hash, variant_key)
        if variant is not None and self._matches(variant, ctx):
            return variant
        return None

    def save(self, step_hash: str, input_hash: str, entry: CacheEntry) -> bool:
        """Store ``entry``; returns False (and logs why) if it cannot be stored."""
        try:
            blob = encode_entry(entry, self.key)
        except Exception as exc:
            log.warning(
                "Output of a cacheable step could not be pickled (%s: %s); it is not "
                "cached and the run goes on.", type(exc).__name__, exc,
            )
            return False
        key = input_hash
        # A variant only when the primary was made from other ctx values; a primary
        # with the same reads (another process stored it meanwhile) is replaced, so
        # concurrent writers of one key leave one entry.
        primary = self._load(step_hash, input_hash)
        if primary is not None and primary.reads != entry.reads:
            key = f"{input_hash}.{_variant_digest(entry.reads)}"
        self.store.put(step_hash, key, blob)
        return True

    def _load(self, step_hash: str, key: str) -> CacheEntry | None:
        blob = self.store.get(step_hash, key)
        if blob is None:
            return None
        try:
            return decode_entry(blob, self.key)
        except CorruptEntryError as exc:
            log.warning("Cache entry %s is damaged (%s); recomputing it.", self.store.where(step_hash, key), exc)
            self.store.delete(step_hash, key)
            return None

    @staticmethod
    def _matches(entry: CacheEntry, ctx: FrozenContext) -> bool:
        for key, digest in entry.reads.items():
            try:
                current = value_digest(ctx._peek(key))
            except Exception:
                return False
            if current != digest:
                return False
        return True

    @staticmethod
    def _variant_key(input_hash: str, keys: Any, ctx: FrozenContext) -> str | None:
        try:
            current = {k: value_digest(ctx._peek(k)) for k in keys}
        except Exception:
            return None
        return f"{input_hash}.{_variant_digest(current)}"


def _variant_digest(reads: dict[Any, str]) -> str:
    # A dict hashes canonically whatever its keys (read keys are strings, plus the
    # tuple pseudo-keys for "listed the keys" and "read the metrics").
    return hash_struct("reads", reads)
