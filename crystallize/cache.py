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

Blobs are ``MAGIC | xxh3-128(body) | body``; a blob that fails its checksum or does
not unpickle is a miss, is deleted, and is rewritten by the run that missed.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import xxhash

from .context import _MISSING, FrozenContext, _Unhashable
from .hashing import hash_struct, hash_value
from .stores import CacheStore

__all__ = ["CacheEntry", "StepCache", "decode_entry", "encode_entry", "read_digests", "value_digest"]

log = logging.getLogger("crystallize.cache")

MAGIC = b"CRYSTALLIZE-ENTRY\x01"
_DIGEST_SIZE = 16
_ABSENT = "<absent>"


class CorruptEntryError(ValueError):
    """A blob is not a whole, valid cache entry."""


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


def encode_entry(entry: CacheEntry) -> bytes:
    """Frame an entry with a checksum. Raises whatever pickling raises."""
    body = cloudpickle.dumps(entry.__dict__, protocol=5)
    return MAGIC + xxhash.xxh3_128_digest(body) + body


def decode_entry(blob: bytes) -> CacheEntry:
    """Check and unpack a blob. Raises :class:`CorruptEntryError` on any damage."""
    head = len(MAGIC)
    if len(blob) < head + _DIGEST_SIZE or not blob.startswith(MAGIC):
        raise CorruptEntryError("bad header")
    view = memoryview(blob)
    digest, body = view[head : head + _DIGEST_SIZE], view[head + _DIGEST_SIZE :]
    if xxhash.xxh3_128_digest(body) != digest:
        raise CorruptEntryError("checksum mismatch")
    try:
        return CacheEntry(**pickle.loads(body))
    except Exception as exc:  # a checksum-valid body from an incompatible writer
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
        store: where the entries live.

    Example:
        >>> import tempfile
        >>> from crystallize import LocalCacheStore
        >>> cache = StepCache(LocalCacheStore(tempfile.mkdtemp()))
        >>> cache.save("s", "i", CacheEntry(output=42))
        True
        >>> cache.lookup("s", "i", FrozenContext()).output
        42
    """

    def __init__(self, store: CacheStore) -> None:
        self.store = store

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
            blob = encode_entry(entry)
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
            return decode_entry(blob)
        except CorruptEntryError as exc:
            log.warning("Cache entry %s/%s is damaged (%s); recomputing it.", step_hash, key, exc)
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
