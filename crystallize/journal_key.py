"""What keys a run journal: the experiment's fingerprint, and what changed between two.

A journal may be resumed only by the experiment that wrote it. :func:`fingerprint`
digests what decides a run's outcome -- each step (the cache's step key: identity,
constructor arguments, code, explicit parameters), the data source, the treatments,
``initial_ctx``, plugins with replicate hooks and the seed (given, or "drawn") -- and
keeps the parts, so :func:`changes` can say in words what differs from a journal's.
The number of replicates and the hypotheses are not part of it: replicate *r* is the
same run whatever the total, and hypotheses never change a run (they are evaluated
afresh on the resumed result).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .fingerprint import code_fingerprint
from .hashing import UnhashableValueError, hash_struct
from .plugins import BasePlugin, SeedPlugin
from .steps import FunctionStep

__all__ = ["KEY_VERSION", "changes", "fingerprint"]

#: Part of every fingerprint: bumping it retires every journal.
KEY_VERSION = 1


def fingerprint(experiment: Any) -> tuple[str, dict[str, Any]]:
    """The digest that keys an experiment's journal, and the parts it is made of.

    Call it before the plugins' ``before_run`` (a drawn seed is not part of it).

    Returns:
        ``(digest, parts)``: parts maps ``steps``, ``datasource``, ``treatments``,
        ``initial_ctx``, ``plugins`` and ``seed`` to digests (per step, treatment and
        plugin where there are several), so a mismatch can say what changed.

    Example:
        >>> from crystallize import Experiment, pipeline_step
        >>> @pipeline_step()
        ... def one(data):
        ...     return data
        >>> a, _ = fingerprint(Experiment(lambda ctx: 0, [one()], initial_ctx={"lr": 0.1}))
        >>> b, _ = fingerprint(Experiment(lambda ctx: 0, [one()], initial_ctx={"lr": 0.2}))
        >>> a == b
        False
    """
    seeds = [p for p in experiment.plugins if isinstance(p, SeedPlugin)]
    hooked = [p for p in experiment.plugins if _has_replicate_hooks(p) and not isinstance(p, SeedPlugin)]
    parts = {
        "steps": [[step.name, _step_digest(step)] for step in experiment.pipeline.steps],
        "datasource": code_fingerprint(experiment.datasource),
        "treatments": {t.name: code_fingerprint(t) for t in experiment.treatments},
        "initial_ctx": code_fingerprint(dict(experiment.initial_ctx)),
        "plugins": [[type(p).__name__, code_fingerprint(p)] for p in hooked],
        "seed": [[p.seed, code_fingerprint(p.seed_fn)] for p in seeds],
    }
    return hash_struct("journal", KEY_VERSION, parts), parts


def _step_digest(step: Any) -> str:
    """The cache's key of a step (identity, constructor arguments, code, explicit parameters).

    A class step that is not cacheable is digested as it is instead: computing its
    cache key would warn about unhashable constructor arguments it never needs hashed.
    """
    if isinstance(step, FunctionStep) or getattr(step, "cacheable", False):
        try:
            return step.step_hash
        except UnhashableValueError:
            pass
    return code_fingerprint(step)


def _has_replicate_hooks(plugin: Any) -> bool:
    cls = type(plugin)
    return (
        getattr(cls, "before_replicate", None) is not BasePlugin.before_replicate
        or getattr(cls, "after_replicate", None) is not BasePlugin.after_replicate
    )


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two fingerprints' parts, in words."""
    said = []
    old_steps, new_steps = dict(map(tuple, old.get("steps", []))), dict(map(tuple, new.get("steps", [])))
    if old_steps != new_steps:
        edited = [n for n in new_steps if n in old_steps and old_steps[n] != new_steps[n]]
        added = [n for n in new_steps if n not in old_steps]
        removed = [n for n in old_steps if n not in new_steps]
        said += [f"step {n!r} changed" for n in edited] + [f"step {n!r} added" for n in added]
        said += [f"step {n!r} removed" for n in removed] or ([] if edited or added else ["the steps' order changed"])
    old_t, new_t = old.get("treatments", {}), new.get("treatments", {})
    said += [f"treatment {n!r} changed" for n in new_t if n in old_t and old_t[n] != new_t[n]]
    said += [f"treatment {n!r} added" for n in new_t if n not in old_t]
    said += [f"treatment {n!r} removed" for n in old_t if n not in new_t]
    labels = {
        "datasource": "the data source changed",
        "initial_ctx": "initial_ctx changed",
        "plugins": "plugins with replicate hooks changed",
        "seed": "the seed changed",
    }
    said += [text for key, text in labels.items() if old.get(key) != _jsonable(new.get(key))]
    return "; ".join(said) or "its fingerprint differs"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
