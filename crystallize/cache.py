"""The step cache: lookups that check ctx reads, saves, single flight, and replay records.

An entry holds a step's output *and* what the step did to its context (metrics,
added keys, artifacts, the state it left its random generators in), plus the digest
of every ctx value the step read and of every generator's state it drew from (see
:mod:`crystallize.randomness`). A lookup only hits when those are unchanged in the
current context, so a treatment that changes a value a step read can never be served
another condition's output. How an entry is stored — a signed manifest per key,
pointing at a content-addressed output blob — is :mod:`crystallize.entries`.

Where manifests go, for a step hash ``S`` and an input hash ``I``:

* ``S/I`` (the primary entry), published create-only by the first run that stores
  ``(S, I)``: the first writer wins;
* ``S/I.<reads-digest>`` (a variant), for runs whose reads differ from the
  primary's. Its name is the digest of the read keys *and* values, so a lookup that
  knows which keys to read finds it directly;
* ``S/I.reads`` (the index), the other sets of keys variants were made with, for a
  step whose reads depend on what it read (``alpha`` in one branch, ``beta`` in the
  other). It changes only when a new set appears; past :data:`MAX_KEY_SETS` sets,
  runs with yet other reads are not cached (no eviction, so no thrashing).

A hit on the primary costs one store read (two when the output is in a blob); on a
variant with the primary's keys, one more; on one with other keys, one more per set
tried. A manifest that fails its MAC, or whose blob is missing or does not match it,
is a miss: it is deleted (a bad blob too) and rewritten by the run that missed. The
store is wrapped in a :class:`~crystallize.stores.GuardedStore`: its ``OSError``
costs a warning, not a run.

**Single flight.** Before a missing entry is computed, :meth:`StepCache.single_flight`
takes its leases (this process, then the store's: see
:mod:`crystallize.stores.flight`); a run that finds one taken waits, and is then a
hit that ``waited``.

A manifest records its last use, rewritten on a hit at most every
:data:`TOUCH_SECONDS`, so ``crystallize cache gc`` can drop what nobody uses (object
stores keep no access times).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import cloudpickle

from ._drive import Loop, driven_async
from .context import _KEYS_READ, _MISSING, FrozenContext, _Unhashable
from .entries import (
    BLOBS,
    INLINE_MAX,
    MAGIC,
    CacheEntry,
    CorruptEntryError,
    Manifest,
    OtherFormatError,
    blob_name,
    decode_entry,
    encode_entry,
    make_manifest,
    open_manifest,
)
from .hashing import hash_struct, hash_value
from .randomness import PREFIX, source_name
from .signing import CacheKeyError, cache_key
from .stores import CacheStore, GuardedStore, capability, flight
from .stores._warn import warn_once
from .stores.flight import Flight

__all__ = [
    "MAGIC",
    "CacheEntry",
    "CorruptEntryError",
    "Flight",
    "StepCache",
    "decode_entry",
    "encode_entry",
    "read_digests",
    "value_digest",
]

log = logging.getLogger("crystallize.cache")

_ABSENT = "<absent>"
_INDEX = ".reads"
#: The most sets of read keys one (step, input) keeps variants for.
MAX_KEY_SETS = 8
#: A hit rewrites its manifest's last use when it is older than this (seconds).
TOUCH_SECONDS = 3600.0


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
        key: the MAC key entries are signed with; default the key the store carries
            (``signing_key``: a :class:`~crystallize.stores.KeyedStore`), else
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
        inner = store.store if isinstance(store, GuardedStore) else store
        # A store resolved in a driver carries the driver's key, so entries written on
        # any node verify on every other (see crystallize.backend.resolve_cache).
        if key is None:
            key = capability(inner, "signing_key")
        # A fresh guard per StepCache (one per run): its `failed` flag is this run's.
        self.store = GuardedStore(inner)
        #: Names the store for single flight in this process: runs of equal stores share leases.
        self.scope = repr(inner)
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
        usable entry exists for ``(step_hash, input_hash)`` at all.
        """
        primary = self._manifest(step_hash, input_hash)
        if primary is None:
            return None, None
        now = _CurrentReads(ctx)
        current = now.digests(primary.reads)
        if current == primary.reads:
            return self._open(step_hash, input_hash, primary), None
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

    def single_flight(self, step_hash: str, input_hash: str, ctx: FrozenContext) -> Loop:
        """Before computing a missing entry: take its leases, or wait for whoever holds them.

        A generator for the step loop (``flight = yield from cache.single_flight(...)``):
        it yields ``asyncio.sleep`` awaitables while it waits in a run driven by an
        event loop, and blocks the thread otherwise.

        Returns:
            (as the generator's value) a :class:`~crystallize.stores.flight.Flight`:
            with ``entry`` set when another run stored it meanwhile (replay it, after
            ``waited`` seconds), else holding the leases; call ``release()`` once the
            entry is stored or the step failed.
        """
        scopes: list[Any] = [flight.ProcessLease(self.scope, step_hash, input_hash)]
        scopes += self.store.lease_scopes(step_hash, input_hash)
        return (
            yield from flight.single_flight(
                scopes, lambda: self.find(step_hash, input_hash, ctx)[0], cooperative=driven_async()
            )
        )

    def save(self, step_hash: str, input_hash: str, entry: CacheEntry, *, step: str | None = None) -> bool:
        """Store ``entry``; returns False (and logs why) if it cannot be stored.

        The output goes to a blob when its pickle is bigger than
        :data:`~crystallize.entries.INLINE_MAX`; the manifest is published
        create-only, so when several runs store one key the first one's entry stays.
        """
        try:
            output = cloudpickle.dumps(entry.output, protocol=5)
            blob = blob_name(output) if len(output) > INLINE_MAX else None

            def frame(where: str) -> bytes:
                return make_manifest(entry, self.key, where, output_pickle=output, step=step, blob=blob)

            primary_frame = frame(f"{step_hash}/{input_hash}")
        except Exception as exc:
            log.warning(
                "Output of a cacheable step could not be pickled (%s: %s); it is not cached and the run goes on.",
                type(exc).__name__,
                exc,
            )
            return False
        if blob is not None and not self.store.contains(BLOBS, blob):
            self.store.put(BLOBS, blob, output)  # before any manifest points at it
        # A variant only when the primary was made from other reads.
        primary = self._manifest(step_hash, input_hash)
        if primary is None:
            if self.store.put_new(step_hash, input_hash, primary_frame):
                return True
            primary = self._manifest(step_hash, input_hash)  # another run published first
            if primary is None:  # something unreadable is in the way: replace it
                self.store.put(step_hash, input_hash, primary_frame)
                return True
        if primary.reads == entry.reads:
            return True
        keys = frozenset(entry.reads)
        if keys != frozenset(primary.reads) and not self._index(step_hash, input_hash, keys):
            return True  # a lookup could never find it: not worth a write
        variant = f"{input_hash}.{_variant_digest(entry.reads)}"
        self.store.put_new(step_hash, variant, frame(f"{step_hash}/{variant}"))
        return True

    def load_record(self, namespace: str, key: str) -> Any:
        """A small signed record saved by :meth:`save_record`, or ``None`` (always read fresh)."""
        frame = self.store.get_fresh(namespace, key)
        manifest = None if frame is None else self._verified(namespace, key, frame)
        if manifest is None or manifest.blob is not None:
            return None
        try:
            return manifest.entry().output
        except CorruptEntryError as exc:
            self._discard(namespace, key, exc)
            return None

    def save_record(self, namespace: str, key: str, value: Any) -> None:
        """Sign and store a small record (an index, the parts of a step's last key)."""
        frame = make_manifest(CacheEntry(output=value), self.key, f"{namespace}/{key}", kind="record")
        self.store.put(namespace, key, frame)

    def _variant(self, step_hash: str, input_hash: str, reads: dict[Any, str]) -> CacheEntry | None:
        name = f"{input_hash}.{_variant_digest(reads)}"
        manifest = self._manifest(step_hash, name)
        if manifest is None or manifest.reads != reads:
            return None
        return self._open(step_hash, name, manifest)

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
            log.debug(
                "Step %s, input %s: %d sets of read keys indexed already; this one is not cached.",
                step_hash,
                input_hash,
                len(sets),
            )
            return False
        try:
            self.save_record(step_hash, f"{input_hash}{_INDEX}", sets + [keys])
        except Exception as exc:  # a read key that does not pickle
            log.debug("Could not index the read keys of %s/%s: %s", step_hash, input_hash, exc)
            return False
        return True

    def _manifest(self, namespace: str, key: str) -> Manifest | None:
        frame = self.store.get(namespace, key)
        return None if frame is None else self._verified(namespace, key, frame)

    def _verified(self, namespace: str, key: str, frame: bytes) -> Manifest | None:
        try:
            return open_manifest(frame, self.key, f"{namespace}/{key}")
        except CorruptEntryError as exc:
            self._discard(namespace, key, exc)
            return None

    def _open(self, namespace: str, key: str, manifest: Manifest) -> CacheEntry | None:
        """The entry of a verified manifest: its output read and checked; ``None`` if lost."""
        try:
            if manifest.blob is None:
                entry = manifest.entry()
            else:
                data = self.store.get(BLOBS, manifest.blob)
                if data is None:
                    log.warning(
                        "Cache entry %s points at output blob %s, which is missing; recomputing it.",
                        self.store.where(namespace, key),
                        manifest.blob,
                    )
                    self.store.delete(namespace, key)
                    return None
                try:
                    manifest.check_blob(data, self.key)
                except CorruptEntryError:
                    self.store.delete(BLOBS, manifest.blob)
                    raise
                entry = manifest.entry(data)
        except CorruptEntryError as exc:
            self._discard(namespace, key, exc)
            return None
        if time.time() - manifest.header.get("used", 0) > TOUCH_SECONDS:
            # Last use, for `crystallize cache gc`: object stores keep no access times.
            self.store.put(namespace, key, manifest.touched(self.key, f"{namespace}/{key}"))
        return entry

    def _discard(self, namespace: str, key: str, exc: Exception) -> None:
        if isinstance(exc, OtherFormatError):  # an upgrade, not damage: say it once, quietly
            warn_once(
                ("other format", repr(self.store)),
                "Cache entries in %s were %s; each is recomputed and replaced when a run needs it.",
                self.store,
                exc,
                level=logging.INFO,
            )
        else:
            log.warning("Cache entry %s is damaged (%s); recomputing it.", self.store.where(namespace, key), exc)
        self.store.delete(namespace, key)


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
