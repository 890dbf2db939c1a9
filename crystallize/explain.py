"""Why a cacheable step missed: the parts of its last key, remembered and compared.

A cache key is a digest, so a miss by itself cannot say what changed. Each time a
step stores an entry for a new ``(step hash, input hash)``, the parts that made the
key (identity with constructor arguments, code, each explicit parameter, each
injected value, the input) are remembered in one small signed record per step (its
qualified name and position in the pipeline), for the last :data:`MAX_INPUTS`
inputs. When a later lookup finds no entry for its key, the record says which part
differs from the last key stored for the same input (or, for a new input, from the
last key stored at all). Reads (ctx values and randomness) are explained by the
cache itself, from the entry that exists for the same key but was made with other
reads.

The record costs one store read on a miss that has no entry at all, and one write
when that miss is stored; a hit never touches it. Concurrent writers may overwrite
each other's record: an explanation is then less specific, never wrong about a key.

Example:
    >>> old = KeyParts("m.f", "c1", {"factor": "d2"}, {}, "i1")
    >>> record = remember(None, old)
    >>> why_missed(record, KeyParts("m.f", "c2", {"factor": "d3"}, {}, "i1"))
    'code changed; params changed: factor'
    >>> why_missed(record, KeyParts("m.f", "c1", {"factor": "d2"}, {}, "i2"))
    'input changed'
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["MAX_INPUTS", "RECORD_KEY", "KeyParts", "remember", "why_missed"]

#: How many inputs a step's record keeps the key parts of.
MAX_INPUTS = 32
#: The store key a step's record lives under (its namespace names the step).
RECORD_KEY = "last"


class KeyParts(NamedTuple):
    """What one cache key was made of, each part as a digest."""

    identity: str
    code: str
    params: dict[str, str]
    injected: dict[str, str]
    input: str


def why_missed(record: Any, parts: KeyParts) -> str | None:
    """Which parts of ``parts`` differ from the last key in ``record``, in words.

    Returns:
        e.g. ``"code changed"``, ``"params changed: factor"``, ``"injected value
        changed: lr"``, ``"constructor arguments changed"``, ``"input changed"``
        (several joined by ``"; "``); ``"entry missing"`` when nothing differs (the
        entry was deleted, damaged or never stored); ``None`` without a record.
    """
    inputs, keys = _read(record)
    new_input = parts.input not in inputs
    index = inputs.get(record.get("last") if new_input else parts.input) if inputs else None
    if index is None:
        return "input changed" if new_input and inputs else None
    try:
        identity, code, params, injected = keys[index]
    except (IndexError, TypeError, ValueError):  # not a record this version wrote
        return None
    reasons = []
    if identity != parts.identity:
        reasons.append("constructor arguments changed")
    if code != parts.code:
        reasons.append("code changed")
    explicit = params.keys() | parts.params.keys()
    changed = _changed(params, parts.params, ())
    if changed:
        reasons.append(f"params changed: {', '.join(changed)}")
    changed = _changed(injected, parts.injected, explicit)  # a name made explicit: said once
    if changed:
        reasons.append(f"injected value changed: {', '.join(changed)}")
    if new_input:
        reasons.append("input changed")
    return "; ".join(reasons) or "entry missing"


def remember(record: Any, parts: KeyParts) -> dict[str, Any]:
    """``record`` with ``parts`` as the last key stored (and the key for its input).

    The record maps each input to one of a few distinct keys (most inputs of a sweep
    share one), in plain tuples and dicts, so it stays small and fast to sign.
    """
    indices, keys = _read(record)
    try:
        by_input = {i: keys[k] for i, k in indices.items() if i != parts.input}
    except (IndexError, TypeError):  # not a record this version wrote: start afresh
        by_input = {}
    by_input[parts.input] = (parts.identity, parts.code, dict(parts.params), dict(parts.injected))
    while len(by_input) > MAX_INPUTS:
        by_input.pop(next(iter(by_input)))
    distinct: list[tuple[Any, ...]] = []
    for value in by_input.values():
        if value not in distinct:
            distinct.append(value)
    return {
        "last": parts.input,
        "inputs": {i: distinct.index(v) for i, v in by_input.items()},
        "keys": distinct,
    }


def _read(record: Any) -> tuple[dict[str, int], list[tuple[Any, ...]]]:
    """The record's input -> key index map and its keys; empty if it is not a record."""
    if isinstance(record, dict):
        inputs, keys = record.get("inputs"), record.get("keys")
        if isinstance(inputs, dict) and isinstance(keys, list):
            return inputs, keys
    return {}, []


def _changed(before: dict[str, str], now: dict[str, str], skip: Any) -> list[str]:
    return sorted(n for n in before.keys() | now.keys() if before.get(n) != now.get(n) and n not in skip)
