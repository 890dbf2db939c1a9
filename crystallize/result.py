"""Results: what one run produced (RunResult) and what an experiment produced (Result)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .hypotheses import HypothesisResult
from .treatments import BASELINE

__all__ = ["ArtifactRecord", "ExperimentMetrics", "Result", "RunError", "RunResult", "TreatmentMetrics"]


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
        return (
            f"replicate {self.replicate}, condition {self.condition!r}, at {self.step}: "
            f"{self.type}: {self.message}"
        )


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


@dataclass
class TreatmentMetrics:
    """Metrics of one condition: name -> values of its successful runs, replicate order."""

    metrics: dict[str, list[Any]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"TreatmentMetrics({self.metrics!r})"


@dataclass
class ExperimentMetrics:
    """``baseline``, ``treatments[name]`` and the evaluated ``hypotheses``."""

    baseline: TreatmentMetrics
    treatments: dict[str, TreatmentMetrics] = field(default_factory=dict)
    hypotheses: list[HypothesisResult] = field(default_factory=list)


class Result:
    """The outcome of ``Experiment.run``.

    Attributes:
        metrics: per-condition metric lists and hypothesis results.
        errors: one :class:`RunError` per failed run (and none for the others).
        runs: every run's :class:`RunResult`, sorted by condition then replicate.
        provenance: experiment-level facts (name, replicates, backend, seed, timing).

    Example:
        >>> from crystallize import Experiment, SeedPlugin, Treatment, pipeline_step
        >>> @pipeline_step()
        ... def noisy(data, ctx, *, shift=0.0):
        ...     return data, {"score": round(ctx["rng"].random() + shift, 3)}
        >>> result = Experiment(lambda ctx: None, [noisy()], plugins=[SeedPlugin(seed=1)],
        ...                     treatments=[Treatment("shifted", {"shift": 1.0})]).run(replicates=3)
        >>> len(result.metrics.baseline.metrics["score"]), result.errors
        (3, [])
        >>> result.run(2, "shifted").seed == result.run(2).seed  # replicate 2 pairs up
        True
    """

    def __init__(
        self,
        runs: Iterable[RunResult],
        conditions: list[str],
        hypotheses: list[HypothesisResult] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        order = {name: i for i, name in enumerate(conditions)}
        self.runs: list[RunResult] = sorted(runs, key=lambda r: (order.get(r.condition, len(order)), r.replicate))
        self.conditions = list(conditions)
        self.provenance: dict[str, Any] = dict(provenance or {})
        self._index = {(r.replicate, r.condition): r for r in self.runs}
        per_condition = {name: TreatmentMetrics() for name in conditions}
        for run in self.runs:
            if run.error is None:
                bucket = per_condition.setdefault(run.condition, TreatmentMetrics()).metrics
                for name, values in run.metrics.items():
                    bucket.setdefault(name, []).extend(values)
        baseline = per_condition.pop(BASELINE, TreatmentMetrics())
        self.metrics = ExperimentMetrics(baseline, per_condition, list(hypotheses or []))
        self.errors: list[RunError] = [r.error for r in self.runs if r.error is not None]

    @property
    def artifacts(self) -> list[tuple[int, str, ArtifactRecord]]:
        """Every artifact as ``(replicate, condition, record)``."""
        return [(r.replicate, r.condition, a) for r in self.runs for a in r.artifacts]

    def run(self, replicate: int, condition: str = BASELINE) -> RunResult:
        """The record of one run, e.g. to pair baseline and treatment replicate ``i``."""
        try:
            return self._index[(replicate, condition)]
        except KeyError:
            raise KeyError(
                f"No run for replicate {replicate} and condition {condition!r}; "
                f"conditions are {self.conditions}."
            ) from None

    def get_hypothesis(self, name: str) -> HypothesisResult | None:
        """The result of the hypothesis called ``name``, or ``None``."""
        return next((h for h in self.metrics.hypotheses if h.name == name), None)

    def to_dataframe(self) -> Any:
        """One row per (run, metric value); needs pandas (``pip install pandas``)."""
        try:
            import pandas
        except ImportError as exc:
            raise ImportError(
                "Result.to_dataframe() needs pandas: pip install pandas"
            ) from exc
        rows = []
        for run in self.runs:
            base = {"replicate": run.replicate, "condition": run.condition, "seed": run.seed,
                    "error": None if run.error is None else str(run.error)}
            if not run.metrics:
                rows.append({**base, "metric": None, "index": None, "value": None})
            for metric, values in run.metrics.items():
                for i, value in enumerate(values):
                    rows.append({**base, "metric": metric, "index": i, "value": value})
        return pandas.DataFrame(rows, columns=["replicate", "condition", "seed", "metric", "index", "value", "error"])

    def summary(self) -> str:
        """A plain-text table: per condition and metric, n, mean and spread; then errors."""
        lines = [f"Experiment {self.provenance.get('name') or ''}".rstrip()
                 + f": {len(self.runs)} runs, {len(self.errors)} failed"]
        rows = [("condition", "metric", "n", "mean", "min", "max")]
        conditions = [(BASELINE, self.metrics.baseline)] + list(self.metrics.treatments.items())
        for cname, tm in conditions:
            for metric, values in tm.metrics.items():
                nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if nums:
                    rows.append((cname, metric, str(len(values)), f"{sum(nums) / len(nums):.4g}",
                                 f"{min(nums):.4g}", f"{max(nums):.4g}"))
                else:
                    rows.append((cname, metric, str(len(values)), "-", "-", "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        for h in self.metrics.hypotheses:
            lines.append(f"Hypothesis {h.name!r} on {h.metrics}: ranking {h.ranking or '-'}")
            for tname, res in h.results.items():
                lines.append(f"  {tname}: {res}")
            for tname, err in h.errors.items():
                lines.append(f"  {tname}: ERROR {err.splitlines()[0]}")
        for err in self.errors:
            lines.append(f"FAILED {err}")
        lines.extend(f"ARTIFACT NOT WRITTEN {m}" for r in self.runs for m in r.artifact_errors)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<Result {len(self.runs)} runs, {len(self.errors)} errors, conditions={self.conditions}>"
