"""FrozenContext: the write-once configuration and metrics a run carries through its steps."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from .errors import ContextMutationError
from .randomness import current_state

__all__ = ["ContextMetrics", "FrozenContext", "active_context"]

# The context of the run executing in this thread or task (for Artifact.write).
_ACTIVE: ContextVar[FrozenContext | None] = ContextVar("crystallize_active_context", default=None)


def active_context() -> FrozenContext | None:
    """The context of the step running in this thread or asyncio task, if any."""
    return _ACTIVE.get()


_MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()
# What a step saw when it listed the keys or read the metrics, recorded like a key it
# read so the step cache checks it too. Never a real key: context keys are strings.
_KEYS_READ = ("crystallize", "keys")
_METRICS_READ = ("crystallize", "metrics")
# The prefix of the pseudo-keys for random generators a step drew from.
_RANDOM_READ = ("crystallize", "random")
_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), frozenset, range)


def _owned(value: Any) -> Any:
    """A copy of ``value`` that no outside reference can change.

    Scalars and tuples of scalars are already immutable; plain containers are deep
    copied; numpy arrays become read-only copies; other objects (models, clients)
    are shared as they are, because copying them is rarely possible or wanted.
    """
    if isinstance(value, _IMMUTABLE):
        return value
    if isinstance(value, tuple) and all(isinstance(v, _IMMUTABLE) for v in value):
        return value
    if isinstance(value, (dict, list, set, tuple, bytearray)):
        return copy.deepcopy(value)
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        frozen = value.copy()
        frozen.setflags(write=False)
        return frozen
    return value


def handed_out(value: Any) -> Any:
    """What a reader gets: mutable containers are copied so edits cannot leak back."""
    if isinstance(value, (dict, list, set, bytearray)) or (
        isinstance(value, tuple) and not all(isinstance(v, _IMMUTABLE) for v in value)
    ):
        return copy.deepcopy(value)
    return value


class _StepRecorder:
    """What one step read from, added to and measured in a context.

    Args:
        snapshot: for cacheable steps, a function that digests a value *when it is
            read*, so a mutable object the step changes afterwards (a random
            generator it draws from) is recorded as the step found it. ``None``
            records only which keys were read.
    """

    __slots__ = ("reads", "added", "metrics", "artifacts", "snapshot")

    def __init__(self, snapshot: Any = None) -> None:
        self.reads: dict[Any, Any] = {}
        self.added: list[tuple[str, Any]] = []
        self.metrics: list[tuple[str, Any]] = []
        self.artifacts: list[Any] = []
        self.snapshot = snapshot

    def note(self, key: Any, value: Any) -> None:
        if key in self.reads:
            return
        if self.snapshot is None:
            self.reads[key] = None
            return
        try:
            self.reads[key] = self.snapshot(value)
        except Exception as exc:  # reported when the entry would be stored
            self.reads[key] = _Unhashable(exc)


class _Unhashable:
    """Stands for a read value that could not be digested."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class ContextMetrics:
    """Named lists of measurements taken during one run.

    Example:
        >>> ctx = FrozenContext()
        >>> ctx.metrics.add("loss", 0.5)
        >>> ctx.metrics["loss"]
        (0.5,)
    """

    __slots__ = ("_values", "_owner")

    def __init__(self, owner: FrozenContext) -> None:
        self._values: dict[str, list[Any]] = {}
        self._owner = owner

    def add(self, name: str, value: Any) -> None:
        """Append ``value`` to the metric ``name`` (a list per name, one per call)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"A metric name must be a non-empty string, got {name!r}.")
        value = _owned(value)
        self._values.setdefault(name, []).append(value)
        recorder = self._owner._recorder
        if recorder is not None:
            recorder.metrics.append((name, value))

    def as_dict(self) -> Mapping[str, tuple[Any, ...]]:
        """A read-only snapshot: metric name -> tuple of values in the order added."""
        self._note_read()
        return MappingProxyType(self._snapshot())

    def __getitem__(self, name: str) -> tuple[Any, ...]:
        self._note_read()
        return tuple(self._values[name])

    def __contains__(self, name: object) -> bool:
        self._note_read()
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        self._note_read()
        return iter(list(self._values))

    def __len__(self) -> int:
        self._note_read()
        return len(self._values)

    def _snapshot(self) -> dict[str, tuple[Any, ...]]:
        return {k: tuple(v) for k, v in self._values.items() if v}

    def _note_read(self) -> None:
        # A step whose output depends on earlier metrics must not be served an entry
        # made when they were different.
        recorder = self._owner._recorder
        if recorder is not None and _METRICS_READ not in recorder.reads:
            # What the step found, not what it added itself: a lookup compares this
            # with the metrics present before the step runs.
            snapshot = {k: list(v) for k, v in self._values.items()}
            for name, _ in reversed(recorder.metrics):
                snapshot[name].pop()
            recorder.note(_METRICS_READ, {k: tuple(v) for k, v in snapshot.items() if v})

    def __repr__(self) -> str:
        return f"ContextMetrics({dict(self.as_dict())!r})"


class FrozenContext:
    """Write-once key/value configuration for one run, plus its metrics.

    Keys can be added but never changed: a step or plugin that sets a key a second
    time gets :class:`ContextMutationError`. Values handed out are copies of plain
    containers and read-only numpy arrays, so editing what ``get`` returned cannot
    change the context.

    Args:
        initial: the starting keys and values.
        logger: the logger steps reach through ``ctx.logger``.

    Example:
        >>> ctx = FrozenContext({"factor": 2})
        >>> ctx.add("offset", 1)
        >>> ctx.get("factor"), ctx["offset"], ctx.get("absent", 0)
        (2, 1, 0)
    """

    __slots__ = (
        "_data",
        "metrics",
        "logger",
        "_recorder",
        "provenance",
        "artifacts",
        "_overridable",
        "__weakref__",
    )

    def __init__(self, initial: Mapping[str, Any] | None = None, *, logger: logging.Logger | None = None) -> None:
        self._data: dict[str, Any] = {}
        self._recorder: _StepRecorder | None = None
        self._overridable: frozenset[str] = frozenset()
        self.metrics = ContextMetrics(self)
        self.logger = logger or logging.getLogger("crystallize")
        #: One record per step run with this context, in order (see StepRecord).
        self.provenance: list[Any] = []
        #: Artifacts written during this run, waiting to be saved by the driver.
        self.artifacts: list[Any] = []
        for key, value in (initial or {}).items():
            self._store(key, value)

    @classmethod
    def for_run(
        cls,
        initial: Mapping[str, Any],
        *,
        replicate: int,
        condition: str,
        logger: logging.Logger | None = None,
    ) -> FrozenContext:
        """A run's fresh context: ``initial`` plus ``replicate`` and ``condition``.

        The keys of ``initial`` are the baseline's configuration: until
        :meth:`seal_overrides` is called, each may be set once more (by the run's
        treatment). Every other key is write-once from the start.

        Example:
            >>> ctx = FrozenContext.for_run({"lr": 0.1}, replicate=0, condition="fast")
            >>> ctx.add("lr", 0.5)          # the treatment's value wins
            >>> ctx.seal_overrides()
            >>> ctx["lr"], ctx["replicate"]
            (0.5, 0)
        """
        ctx = cls({**initial, "replicate": replicate, "condition": condition}, logger=logger)
        ctx._overridable = frozenset(initial) - {"replicate", "condition"}
        return ctx

    def seal_overrides(self) -> None:
        """From now on no key may be set again (see :meth:`for_run`)."""
        self._overridable = frozenset()

    # -- reading --------------------------------------------------------------
    def peek(self, key: str, default: Any = None) -> Any:
        """Like :meth:`get`, but not recorded as a read of the running step.

        For the framework (parameter injection, plugins, backends), whose lookups are
        part of a cache key already or happen outside steps. The value is the stored
        one, not a copy: do not edit it.
        """
        value = self._data.get(key, _MISSING)
        return default if value is _MISSING else value

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value for ``key``, or ``default`` when it is absent."""
        value = self._data.get(key, _MISSING)
        self._note_read(key, value)
        return default if value is _MISSING else handed_out(value)

    def __getitem__(self, key: str) -> Any:
        value = self._data.get(key, _MISSING)
        self._note_read(key, value)
        if value is _MISSING:
            raise KeyError(key)
        return handed_out(value)

    def __contains__(self, key: object) -> bool:
        value = self._data.get(key, _MISSING)  # type: ignore[call-overload]
        self._note_read(key, value)  # type: ignore[arg-type]
        return value is not _MISSING

    def keys(self) -> list[str]:
        """The keys present now, in insertion order."""
        self._note_keys()
        return list(self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        self._note_keys()
        return len(self._data)

    def as_dict(self) -> Mapping[str, Any]:
        """A read-only snapshot of every key and value."""
        self._note_keys()
        for key, value in self._data.items():
            self._note_read(key, value)
        return MappingProxyType({k: handed_out(v) for k, v in self._data.items()})

    # -- writing --------------------------------------------------------------
    def add(self, key: str, value: Any) -> None:
        """Add a new key. Raises :class:`ContextMutationError` if ``key`` exists."""
        self._store(key, value)
        recorder = self._recorder
        if recorder is not None:
            recorder.added.append((key, self._data[key]))

    def __setitem__(self, key: str, value: Any) -> None:
        """``ctx[key] = value`` is ``ctx.add(key, value)``: new keys only."""
        self.add(key, value)

    def __delitem__(self, key: str) -> None:
        raise ContextMutationError(key, f"Context keys cannot be deleted (tried {key!r}).")

    def _store(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"Context keys must be strings, got {key!r}.")
        if key in self._data:
            if key not in self._overridable:
                raise ContextMutationError(key)
            self._overridable = self._overridable - {key}
        self._data[key] = _owned(value)

    # -- recording (used by Pipeline) -----------------------------------------
    def _note_read(self, key: str, value: Any) -> None:
        recorder = self._recorder
        if recorder is not None and key not in recorder.reads:
            if any(key == added for added, _ in recorder.added):
                return  # the step reads back what it added itself
            recorder.note(key, value)

    def _note_keys(self) -> None:
        recorder = self._recorder
        if recorder is not None and _KEYS_READ not in recorder.reads:
            own = {key for key, _ in recorder.added}
            recorder.note(_KEYS_READ, tuple(k for k in self._data if k not in own))

    def _replay(self, metrics: Any, added: Any, artifacts: Any) -> None:
        """Apply what a step did elsewhere (a cache entry, a hosted call): metrics, keys, artifacts."""
        for name, value in metrics:
            self.metrics.add(name, value)
        for key, value in added:
            self.add(key, value)
        for artifact in artifacts:
            self._replay_artifact(artifact)

    def _replay_artifact(self, artifact: Any) -> None:
        """Keep an artifact written (or replayed from the cache) during this run."""
        self.artifacts.append(artifact)
        recorder = self._recorder
        if recorder is not None:
            recorder.artifacts.append(artifact)

    def _peek(self, key: str) -> Any:
        """The stored value or the missing sentinel, without recording a read.

        For the pseudo-keys a step cache records, what the step would find now: the
        keys, the metrics, or a random generator's state (``("crystallize",
        "random", source)``, see :mod:`crystallize.randomness`).
        """
        if key == _KEYS_READ:
            return tuple(self._data)
        if key == _METRICS_READ:
            return self.metrics._snapshot()
        if type(key) is tuple and key[:2] == _RANDOM_READ:
            state = current_state(key, self)  # type: ignore[arg-type]
            return _MISSING if state is None else state
        return self._data.get(key, _MISSING)

    def _stored_items(self) -> Iterator[tuple[str, Any]]:
        """The stored keys and values, not recorded as reads (for the framework)."""
        return iter(list(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenContext({dict(self._data)!r})"
