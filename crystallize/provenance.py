"""StepRecord: what one step did in one run, for audits and debugging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepRecord"]


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
        cache: ``"off"`` (not cacheable), ``"hit"``, ``"miss"`` (ran and stored) or
            ``"skipped"`` (ran, but the output or a ctx value could not be stored).
        reads: ctx keys the step read through ``get``/``[]``/``in``/``as_dict``, plus
            ``("crystallize", "keys")`` if it listed the keys and
            ``("crystallize", "metrics")`` if it read the metrics.
        added: ctx keys the step added.
        seconds: wall time, including cache lookup and store.
    """

    name: str
    index: int
    params: dict[str, Any] = field(default_factory=dict)
    step_hash: str | None = None
    input_hash: str | None = None
    cache: str = "off"
    reads: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    seconds: float = 0.0
