"""What one run produced: RunResult, with its RunError and ArtifactRecords."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ArtifactRecord", "RunError", "RunResult"]


@dataclass(frozen=True)
class ArtifactRecord:
    """Bytes a step wrote with ``Artifact(name).write(...)``, carried to the driver."""

    name: str
    data: bytes


@dataclass(frozen=True)
class RunError:
    """Why one run failed.

    Attributes:
        replicate: the run's replicate number.
        condition: ``"baseline"`` or the treatment name.
        step: where it failed: a step name, ``"datasource"``, ``"treatment"``,
            ``"plugin <Name>.<hook>"``, ``"worker"`` (the process running it died) or
            ``"result"`` (its result could not be sent back from a worker process).
        type: the exception's class name.
        message: the exception's message.
        traceback: the formatted traceback, as text.
    """

    replicate: int
    condition: str
    step: str
    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"replicate {self.replicate}, condition {self.condition!r}, at {self.step}: {self.type}: {self.message}"


@dataclass
class RunResult:
    """Everything one (replicate, condition) run produced; small and picklable.

    Attributes:
        replicate, condition: which run this is.
        metrics: metric name -> values the run recorded, in order.
        seed: the run's seed when a SeedPlugin is used.
        provenance: one StepRecord per step that ran.
        artifacts: artifacts the run wrote, for the driver to save.
        error: why the run failed, or ``None``.
        seconds: wall time of the run.
        attempts: how many times a backend started it (retries after lost workers).
        artifact_errors: one message per artifact the driver could not save.
    """

    replicate: int
    condition: str
    metrics: dict[str, list[Any]] = field(default_factory=dict)
    seed: int | None = None
    provenance: list[Any] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    error: RunError | None = None
    seconds: float = 0.0
    attempts: int = 1
    artifact_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None
