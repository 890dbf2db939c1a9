"""The step loop's cache side: a cacheable step's key, its lookup, storing and replaying an entry.

:func:`crystallize.pipeline` calls these around each cacheable step: :func:`cache_key`
before the call, :func:`lookup` (which replays a hit into the run's context), the
generator states the step may draw from (:func:`capture_generators`,
:func:`consumed_generators`), and :func:`store_entry` after a miss. Anything that
fails here costs the cache, never the run.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

from .cache import CacheEntry, StepCache, read_digests
from .context import FrozenContext, _StepRecorder
from .errors import StepError
from .explain import RECORD_KEY, KeyParts, remember, why_missed
from .fingerprint import code_fingerprint
from .hashing import UnhashableValueError, hash_struct, hash_value
from .provenance import CacheStatus
from .randomness import capture, consumed, restore
from .steps import PipelineStep, step_key

__all__ = [
    "Keys",
    "Miss",
    "cache_key",
    "capture_generators",
    "consumed_generators",
    "lookup",
    "replay_entry",
    "replay_step",
    "store_entry",
]

log = logging.getLogger("crystallize.pipeline")
cache_log = logging.getLogger("crystallize.cache")


class Keys:
    """A cacheable step's cache key for one call, and the parts it was made of."""

    __slots__ = ("input_hash", "parts", "step_hash")

    def __init__(self, step_hash: str, input_hash: str, parts: KeyParts) -> None:
        self.step_hash, self.input_hash, self.parts = step_hash, input_hash, parts


class Miss:
    """Why a lookup missed, and the step's key record to update when it is stored."""

    __slots__ = ("namespace", "reason", "record")

    def __init__(self, reason: str | None, namespace: str | None = None, record: Any = None) -> None:
        self.reason, self.namespace, self.record = reason, namespace, record


def lookup(
    cache: StepCache, keys: Keys, ctx: FrozenContext, step: PipelineStep, index: int
) -> tuple[CacheEntry | None, Miss | None]:
    """The entry for ``keys`` replayed into ``ctx``, or ``(None, why it missed)``."""
    entry, reason = cache.find(keys.step_hash, keys.input_hash, ctx)
    if entry is None:
        miss = Miss(reason)
        if reason is None:  # no entry for this key at all: the step's last key says why
            miss.namespace = hash_struct("explain", step.qualified_name(), index)
            miss.record = cache.load_record(miss.namespace, RECORD_KEY)
            miss.reason = why_missed(miss.record, keys.parts)
        cache_log.debug(
            "Step %r (index %d) missed the cache: %s.", step.name, index, miss.reason or "no entry for this step yet"
        )
        return None, miss
    replay_step(entry, ctx, step, index)
    return entry, None


def replay_step(entry: CacheEntry, ctx: FrozenContext, step: PipelineStep, index: int) -> None:
    try:
        replay_entry(entry, ctx)
    except Exception as exc:  # fail as the step itself would have
        raise StepError(step.name, index, exc) from exc


def capture_generators(step: PipelineStep, ctx: FrozenContext) -> list[Any] | None:
    try:
        return capture(ctx)
    except Exception as exc:  # an optimisation never costs a run
        _unreadable_generators(step, exc)
        return None


def consumed_generators(step: PipelineStep, generators: list[Any] | None) -> list[Any] | None:
    """The generators the step drew from; ``None`` if that cannot be known (not stored)."""
    if generators is None:
        return None
    try:
        return consumed(generators)
    except Exception as exc:
        _unreadable_generators(step, exc)
        return None


def _unreadable_generators(step: PipelineStep, exc: Exception) -> None:
    log.warning(
        "Step %r: the random generators' state could not be read (%s: %s); its output is not cached.",
        step.name,
        type(exc).__name__,
        exc,
    )


def cache_key(step: PipelineStep, params: dict[str, Any], data: Any) -> Keys | None:
    try:
        identity, code = step.cache_identity()
    except UnhashableValueError:
        return None  # the step warned once, naming the type, when it found out
    try:
        explicit = {name: _param_digest(value) for name, value in dict(step.params).items()}
        injected = {name: _param_digest(value) for name, value in params.items() if name not in explicit}
        input_hash = hash_value(data)
    except Exception as exc:
        log.warning(
            "Step %r is cacheable but its parameters or input could not be hashed (%s: %s); it runs without the cache.",
            step.name,
            type(exc).__name__,
            exc,
        )
        return None
    parts = KeyParts(identity, code, explicit, injected, input_hash)
    return Keys(step_key(identity, code, explicit, injected), input_hash, parts)


def _param_digest(value: Any) -> str:
    """A parameter's digest; a function (or a partial of one) by its code, not its name.

    ``step(fn=helper)``: editing ``helper`` must miss, and a lambda has no name to go by.
    """
    target = value.func if isinstance(value, functools.partial) else value
    if isinstance(target, types.FunctionType):
        args = (value.args, value.keywords) if target is not value else ()
        return hash_struct("function parameter", code_fingerprint(target), hash_value(args))
    return hash_value(value)


def store_entry(
    cache: StepCache,
    step: PipelineStep,
    keys: Keys,
    output: Any,
    recorder: _StepRecorder,
    moved: list[tuple[Any, Any, Any]],
    miss: Miss | None,
) -> CacheStatus:
    # A generator the step drew from is read like a ctx value: the entry holds for
    # its state at entry only, and a hit leaves it where the step left it.
    for key, before, _ in moved:
        recorder.note(key, before)
    try:
        reads = read_digests(recorder.reads)
    except Exception as exc:
        log.warning(
            "Step %r read a context value that cannot be hashed (%s); its output is not cached.",
            step.name,
            exc,
        )
        return "skipped"
    entry = CacheEntry(
        output,
        list(recorder.metrics),
        list(recorder.added),
        reads,
        list(recorder.artifacts),
        {key: after for key, _, after in moved},
    )
    if not cache.save(keys.step_hash, keys.input_hash, entry, step=step.name):
        log.warning("Step %r: output not cached (see the warning above).", step.name)
        return "skipped"
    if miss is not None and miss.namespace is not None:
        try:
            cache.save_record(miss.namespace, RECORD_KEY, remember(miss.record, keys.parts))
        except Exception as exc:  # only explanations suffer
            cache_log.debug("Step %r: could not record its key's parts: %s", step.name, exc)
    return "miss"


def replay_entry(entry: CacheEntry, ctx: FrozenContext) -> None:
    ctx._replay(entry.metrics, entry.added, entry.artifacts)
    for key, state in entry.random_after.items():
        restore(key, state, ctx)
