"""The step cache: entry framing, checksums, lookups that check ctx reads, and replay.

An entry holds a step's output *and* what the step did to its context (metrics,
added keys, artifacts, the state it left its random generators in), plus the digest
of every ctx value the step read and of every generator's state it drew from (see
:mod:`crystallize.randomness`). A lookup only hits when those are unchanged in the
current context, so a treatment that changes a value a step read can never be served
another condition's output.

Where entries go, for a step hash ``S`` and an input hash ``I``:

* ``S/I`` (the primary entry), written by the first run that stores ``(S, I)``;
* ``S/I.<reads-digest>`` (a variant), for runs whose reads differ from the
  primary's. Its name is the digest of the read keys *and* values, so a lookup that
  knows which keys to read finds it directly;
* ``S/I.reads`` (the index), the other sets of keys variants were made with, for a
  step whose reads depend on what it read (``alpha`` in one branch, ``beta`` in the
  other). It changes only when a new set appears; past :data:`MAX_KEY_SETS` sets,
  runs with yet other reads are not cached (no eviction, so no thrashing).

A hit on the primary costs one store read; on a variant with the primary's keys,
two; on one with other keys, three plus one per set tried before it.

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

from .context import _KEYS_READ, _MISSING, FrozenContext, _Unhashable
from .hashing import hash_struct, hash_value
from .randomness import PREFIX, source_name
from .signing import MAC_SIZE, CacheKeyError, cache_key, sign, verify
from .stores import CacheStore, GuardedStore, KeyedStore

__all__ = ["CacheEntry", "StepCache", "decode_entry", "encode_entry", "read_digests", "value_digest"]

log = logging.getLogger("crystallize.cache")

# The last byte is the frame version: 2 added a MAC (HMAC-SHA256), 3 made it GMAC;
# entries of older frames are misses and get rewritten.
MAGIC = b"CRYSTALLIZE-ENTRY\x03"
_ABSENT = "<absent>"
_INDEX = ".reads"
#: The most sets of read keys one (step, input) keeps variants for.
MAX_KEY_SETS = 8


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
        random_after: randomness pseudo-read key -> the generator's state after the
            step, restored on a hit (see :mod:`crystallize.randomness`).
    """

    output: Any
    metrics: list[tuple[str, Any]] = field(default_factory=list)
    added: list[tuple[str, Any]] = field(default_factory=list)
    reads: dict[Any, str] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    random_after: dict[Any, Any] = field(default_factory=dict)


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
        return self.find(step_hash, input_hash, ctx)[0]

    def find(self, step_hash: str, input_hash: str, ctx: FrozenContext) -> tuple[CacheEntry | None, str | None]:
        """``(entry, None)`` on a hit; on a miss ``(None, why)``.

        ``why`` says which reads differ from the primary entry's (``"ctx read
        changed: alpha"``, ``"randomness changed: numpy"``), or is ``None`` when no
        entry exists for ``(step_hash, input_hash)`` at all.
        """
        primary = self._load(step_hash, input_hash)
        if primary is None:
            return None, None
        now = _CurrentReads(ctx)
        current = now.digests(primary.reads)
        if current == primary.reads:
            return primary, None
        tried = {frozenset(primary.reads)}
        if current is not None:
            found = self._variant(step_hash, input_hash, current)
            if found is not None:
                return found, None
        for keys in self._key_sets(step_hash, input_hash):
            if keys in tried:
                continue
            tried.add(keys)
            candidate = now.digests(keys)
            found = None if candidate is None else self._variant(step_hash, input_hash, candidate)
            if found is not None:
                return found, None
        return None, now.changed(primary.reads)

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
        # A variant only when the primary was made from other reads; a primary with
        # the same reads (another process stored it meanwhile) is replaced, so
        # concurrent writers of one key leave one entry.
        primary = self._load(step_hash, input_hash)
        if primary is None or primary.reads == entry.reads:
            self.store.put(step_hash, input_hash, blob)
            return True
        keys = frozenset(entry.reads)
        if keys != frozenset(primary.reads) and not self._index(step_hash, input_hash, keys):
            return True  # a lookup could never find it: not worth a write
        self.store.put(step_hash, f"{input_hash}.{_variant_digest(entry.reads)}", blob)
        return True

    def load_record(self, namespace: str, key: str) -> Any:
        """A small signed record saved by :meth:`save_record`, or ``None``."""
        entry = self._load(namespace, key)
        return None if entry is None else entry.output

    def save_record(self, namespace: str, key: str, value: Any) -> None:
        """Sign and store a small record (an index, the parts of a step's last key)."""
        self.store.put(namespace, key, encode_entry(CacheEntry(output=value), self.key))

    def _variant(self, step_hash: str, input_hash: str, reads: dict[Any, str]) -> CacheEntry | None:
        found = self._load(step_hash, f"{input_hash}.{_variant_digest(reads)}")
        return found if found is not None and found.reads == reads else None

    def _key_sets(self, step_hash: str, input_hash: str) -> list[frozenset[Any]]:
        sets = self.load_record(step_hash, f"{input_hash}{_INDEX}")
        return list(sets) if isinstance(sets, (list, tuple)) else []

    def _index(self, step_hash: str, input_hash: str, keys: frozenset[Any]) -> bool:
        """Add ``keys`` to the index; whether they are (now) in it."""
        sets = self._key_sets(step_hash, input_hash)
        if keys in sets:
            return True
        if len(sets) >= MAX_KEY_SETS:
            # A full index stays as it is (no eviction, so no thrashing between sets):
            # lookups stay bounded and runs with yet other reads simply run.
            log.debug("Step %s, input %s: %d sets of read keys indexed already; this one "
                      "is not cached.", step_hash, input_hash, len(sets))
            return False
        try:
            self.save_record(step_hash, f"{input_hash}{_INDEX}", sets + [keys])
        except Exception as exc:  # a read key that does not pickle
            log.debug("Could not index the read keys of %s/%s: %s", step_hash, input_hash, exc)
            return False
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



class _CurrentReads:
    """What a step would read now, digested once per key however many entries ask."""

    __slots__ = ("_ctx", "_memo")

    def __init__(self, ctx: FrozenContext) -> None:
        self._ctx = ctx
        self._memo: dict[Any, str | None] = {}

    def digest(self, key: Any) -> str | None:
        if key not in self._memo:
            try:
                self._memo[key] = value_digest(self._ctx._peek(key))
            except Exception:  # cannot be hashed now, so no stored entry can match it
                self._memo[key] = None
        return self._memo[key]

    def digests(self, keys: Any) -> dict[Any, str] | None:
        """key -> current digest, or ``None`` if one of them cannot be hashed."""
        found = {}
        for key in keys:
            digest = self.digest(key)
            if digest is None:
                return None
            found[key] = digest
        return found

    def changed(self, recorded: dict[Any, str]) -> str:
        """Which of ``recorded``'s reads differ now, in words."""
        differ = [key for key, digest in recorded.items() if self.digest(key) != digest]
        return describe_reads(differ)


def describe_reads(keys: Any) -> str:
    """``"ctx read changed: alpha; randomness changed: numpy"`` for the differing keys.

    Example:
        >>> describe_reads(["b", "a", ("crystallize", "random", "numpy")])
        'ctx read changed: a, b; randomness changed: numpy'
    """
    ctx_keys, random_sources, other = [], [], []
    for key in keys:
        if isinstance(key, str):
            ctx_keys.append(key)
        elif key[:2] == PREFIX:
            random_sources.append(source_name(key))
        else:
            other.append("ctx keys changed" if key == _KEYS_READ else "metrics read changed")
    # A context generator that moved is named once, as randomness.
    ctx_keys = [k for k in ctx_keys if f"ctx:{k}" not in random_sources]
    parts = [f"ctx read changed: {', '.join(sorted(ctx_keys))}"] if ctx_keys else []
    parts += sorted(set(other))
    if random_sources:
        parts.append(f"randomness changed: {', '.join(sorted(random_sources))}")
    return "; ".join(parts) or "reads changed"


def _variant_digest(reads: dict[Any, str]) -> str:
    # A dict hashes canonically whatever its keys (read keys are strings, plus the
    # tuple pseudo-keys for listing the keys, reading the metrics and randomness).
    return hash_struct("reads", reads)
