"""StepRecord: what one step did in one run, for audits and debugging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CacheStatus", "StepRecord"]

#: What the step cache did for one step execution:
#: ``"off"`` not cacheable (or caching turned off); ``"hit"`` replayed an entry;
#: ``"miss"`` ran and stored its entry; ``"skipped"`` ran, but its key or entry could
#: not be made (unhashable input, unpicklable output); ``"error"`` ran, but the store
#: failed (the run is unaffected).
CacheStatus = Literal["off", "hit", "miss", "skipped", "error"]

_FRESH: Any = object()  # params not given: each record gets a dict of its own


@dataclass(frozen=True)
class StepRecord:
    """Provenance of one step execution.

    Attributes:
        name: the step's name.
        index: its position in the pipeline.
        params: the parameters it ran with (explicit and injected).
        step_hash: digest of the step's identity, code and parameters (cacheable
            steps only, else ``None``).
        input_hash: digest of the data it received (cacheable steps only).
        cache: a :data:`CacheStatus`: ``"off"``, ``"hit"``, ``"miss"``,
            ``"skipped"`` or ``"error"``.
        reads: ctx keys the step read through ``get``/``[]``/``in``/``as_dict``, plus
            ``("crystallize", "keys")`` if it listed the keys,
            ``("crystallize", "metrics")`` if it read the metrics and
            ``("crystallize", "random", source)`` for each random generator a
            cacheable step drew from (``"random"``, ``"numpy"``, ``"torch"``,
            ``"ctx:<key>"``).
        added: ctx keys the step added.
        seconds: wall time, including cache lookup and store.
        miss_reason: for a cacheable step that found no entry, what differs from the
            entries that exist for it: ``"code changed"``, ``"constructor arguments
            changed"``, ``"params changed: factor"``, ``"injected value changed:
            lr"``, ``"input changed"``, ``"ctx read changed: alpha"``, ``"randomness
            changed: numpy"`` (several joined by ``"; "``), ``"entry missing"`` when
            nothing differs; ``None`` on a hit, with the cache off, or when the cache
            holds nothing for the step yet.
        waited: seconds this run waited while another run computed the same entry
            (single flight); the step is then a ``"hit"`` (or, if the other run
            failed, a ``"miss"`` computed here).
        served_by: where the step ran when a backend hosts it elsewhere (e.g.
            ``"actor=<id> node=<id> pid=<pid>"`` for a Ray actor pool); ``None`` when it
            ran in the run's own process or was a cache hit.
    """

    name: str
    index: int
    params: dict[str, Any] = field(default_factory=dict)
    step_hash: str | None = None
    input_hash: str | None = None
    cache: CacheStatus = "off"
    reads: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    seconds: float = 0.0
    miss_reason: str | None = None
    waited: float = 0.0
    served_by: str | None = None

    def __init__(
        self,
        name: str,
        index: int,
        params: dict[str, Any] = _FRESH,
        step_hash: str | None = None,
        input_hash: str | None = None,
        cache: CacheStatus = "off",
        reads: tuple[str, ...] = (),
        added: tuple[str, ...] = (),
        seconds: float = 0.0,
        miss_reason: str | None = None,
        waited: float = 0.0,
        served_by: str | None = None,
    ) -> None:
        # The dataclass's own __init__ for a frozen class sets each of the twelve fields
        # through object.__setattr__; one is made per step of every run, so fill the
        # instance's dict at once (field order kept, so repr, pickles and eq are alike).
        self.__dict__.update(
            name=name,
            index=index,
            params={} if params is _FRESH else params,
            step_hash=step_hash,
            input_hash=input_hash,
            cache=cache,
            reads=reads,
            added=added,
            seconds=seconds,
            miss_reason=miss_reason,
            waited=waited,
            served_by=served_by,
        )
