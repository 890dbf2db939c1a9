"""Results: what one run produced (RunResult) and what an experiment produced (Result)."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunsFailedError
from .hypotheses import HypothesisResult
from .plotting import plot_result
from .run_result import ArtifactRecord, RunError, RunResult
from .saving import load_parts, save_parts
from .table import COLUMNS, columns_of, rows
from .treatments import BASELINE

__all__ = ["ArtifactRecord", "ExperimentMetrics", "Result", "RunError", "RunResult", "TreatmentMetrics"]


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
        conditions: ``"baseline"`` and the treatment names, in the experiment's order.
        provenance: where the result came from: name, replicates, conditions, backend,
            seed, ``started``/``ended`` (ISO 8601 UTC), ``seconds``, ``complete``,
            ``host``, ``platform``, ``versions`` (python, crystallize, numpy, ray),
            ``packages`` (the installed distributions the experiment's code imports),
            ``git`` (``commit``, ``dirty``, ``root`` of the source tree, when in one).
        treatment_params: condition -> its value of each key a mapping treatment sets
            (the baseline's from ``initial_ctx``); the parameter columns of
            :meth:`to_dataframe`.

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
        >>> result.treatment_params, result.provenance["complete"]
        ({'baseline': {'shift': None}, 'shifted': {'shift': 1.0}}, True)
    """

    def __init__(
        self,
        runs: Iterable[RunResult],
        conditions: list[str],
        hypotheses: list[HypothesisResult] | None = None,
        provenance: dict[str, Any] | None = None,
        treatment_params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        order = {name: i for i, name in enumerate(conditions)}
        self.runs: list[RunResult] = sorted(runs, key=lambda r: (order.get(r.condition, len(order)), r.replicate))
        self.conditions = list(conditions)
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.treatment_params: dict[str, dict[str, Any]] = {
            c: dict(values) for c, values in (treatment_params or {}).items()
        }
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
                f"No run for replicate {replicate} and condition {condition!r}; conditions are {self.conditions}."
            ) from None

    def raise_for_errors(self) -> Result:
        """Raise :class:`~crystallize.RunsFailedError` if any run failed; else return self.

        The error lists every failed run (replicate, condition, step, exception) and the
        first one's traceback, and carries this result as ``exc.result``. For scripts
        and batch jobs that must fail when runs fail: ``exp.run().raise_for_errors()``,
        or ``exp.run(strict=True)``.

        Returns:
            This result, when no run failed (so calls can be chained).

        Raises:
            RunsFailedError: one or more runs failed.

        Example:
            >>> ok = Result([RunResult(0, "baseline", {"x": [1]})], ["baseline"])
            >>> ok.raise_for_errors() is ok
            True
            >>> bad = RunResult(1, "baseline", error=RunError(1, "baseline", "fit", "ValueError", "nan loss"))
            >>> Result([bad], ["baseline"]).raise_for_errors()
            Traceback (most recent call last):
            ...
            crystallize.errors.RunsFailedError: 1 of 1 runs failed:
              - replicate 1, condition 'baseline', at fit: ValueError: nan loss
            The other runs finished: exc.result holds every run, and exc.result.errors each failure with its traceback.
        """
        if self.errors:
            raise RunsFailedError(self)
        return self

    def get_hypothesis(self, name: str) -> HypothesisResult | None:
        """The result of the hypothesis called ``name``, or ``None``."""
        return next((h for h in self.metrics.hypotheses if h.name == name), None)

    def to_dataframe(self) -> Any:
        """One row per (run, metric value), with each condition's treatment parameters.

        Columns: ``replicate, condition, seed, metric, index, value, error``, then one
        per key a mapping treatment sets (see :mod:`crystallize.table`), so "accuracy
        against C" is ``df[df.metric == "accuracy"].groupby("C")["value"].mean()``.
        A run without metrics (e.g. a failed one) has one row with an empty metric.

        Returns:
            A ``pandas.DataFrame``.

        Raises:
            ImportError: pandas is missing (``pip install 'crystallize-lab[parquet]'``).
        """
        try:
            import pandas  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ImportError(
                "Result.to_dataframe() needs pandas: pip install 'crystallize-lab[parquet]' (or pandas)"
            ) from exc
        columns = [*COLUMNS, *(column for column, _ in columns_of(self.treatment_params))]
        return pandas.DataFrame(rows(self.runs, self.treatment_params), columns=columns)

    def save(self, folder: str | os.PathLike[str], *, table: str = "auto") -> Path:
        """Save this result as a folder that :meth:`load` turns back into an equal Result.

        The folder holds ``result.json`` and ``runs.jsonl`` (every field, in the record
        format of :mod:`crystallize.records`) and ``runs.parquet`` or ``runs.csv`` (the
        :meth:`to_dataframe` table, to open with pandas, polars, DuckDB or a
        spreadsheet). It is written under a temporary name and renamed into place, so
        a crash never leaves half a saved result. Values that are not JSON data (a
        model object, a ``datetime``) are stored as their ``repr`` and load back as
        strings; a warning lists them. Nothing is pickled.

        Args:
            folder: the folder to write; an earlier saved result there is replaced.
            table: ``"auto"`` (Parquet when pandas and pyarrow are installed, else
                CSV), ``"parquet"`` or ``"csv"``.

        Returns:
            The folder's absolute path.

        Raises:
            FileExistsError: ``folder`` holds other files; nothing is replaced.
            ImportError: ``table="parquet"`` without ``pip install 'crystallize-lab[parquet]'``.

        Example:
            >>> import tempfile
            >>> result = Result([RunResult(0, "baseline", {"x": [1.5]})], ["baseline"])
            >>> folder = result.save(tempfile.mkdtemp() + "/saved")
            >>> Result.load(folder).metrics.baseline.metrics
            {'x': [1.5]}
        """
        return save_parts(
            folder,
            runs=self.runs,
            conditions=self.conditions,
            hypotheses=self.metrics.hypotheses,
            provenance=self.provenance,
            treatment_params=self.treatment_params,
            table=table,
        )

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Result:
        """The Result that :meth:`save` wrote to ``folder``, equal in every field.

        Raises:
            RecordError: (a ``ValueError``) nothing saved there, or its files are
                damaged, or written by a newer crystallize.
        """
        parts = load_parts(folder)
        return cls(
            parts["runs"],
            parts["conditions"],
            hypotheses=parts["hypotheses"],
            provenance=parts["provenance"],
            treatment_params=parts["treatment_params"],
        )

    def plot(self, metric: str | None = None, path: str | os.PathLike[str] | None = None) -> Any:
        """Each metric's distribution per condition; hypotheses' verdicts in the title.

        One box plot (with the runs' values as points) per numeric metric; metrics
        that are not numbers are skipped with a note on the figure. Needs matplotlib.

        Args:
            metric: the one metric to draw; ``None`` draws every numeric metric.
            path: when given, the figure is saved there (format from the suffix).

        Returns:
            The ``matplotlib.figure.Figure``.

        Raises:
            ImportError: matplotlib is missing (``pip install 'crystallize-lab[plot]'``).
            ValueError: ``metric`` is unknown or not numeric, or no metric is numeric.
        """
        return plot_result(self, metric=metric, path=path)

    def summary(self) -> str:
        """A plain-text table: per condition and metric, n, mean and spread; then errors."""
        lines = [
            f"Experiment {self.provenance.get('name') or ''}".rstrip()
            + f": {len(self.runs)} runs, {len(self.errors)} failed"
        ]
        origin = _origin(self.provenance)
        if origin:
            lines.append(origin)
        rows = [("condition", "metric", "n", "mean", "min", "max")]
        conditions = [(BASELINE, self.metrics.baseline)] + list(self.metrics.treatments.items())
        for cname, tm in conditions:
            for metric, values in tm.metrics.items():
                nums = [float(v) for v in values if isinstance(v, numbers.Real) and not isinstance(v, bool)]
                if nums:
                    rows.append(
                        (
                            cname,
                            metric,
                            str(len(values)),
                            f"{sum(nums) / len(nums):.4g}",
                            f"{min(nums):.4g}",
                            f"{max(nums):.4g}",
                        )
                    )
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
                lines.append(f"  {tname}: {_brief(res)}")
            for tname, text in h.errors.items():
                lines.append(f"  {tname}: ERROR {text.splitlines()[0]}")
        lines.extend(f"FAILED {err}" for err in self.errors)
        lines.extend(f"ARTIFACT NOT WRITTEN {m}" for r in self.runs for m in r.artifact_errors)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<Result {len(self.runs)} runs, {len(self.errors)} errors, conditions={self.conditions}>"


def _brief(values: Mapping[str, Any]) -> str:
    """A verifier's answer as ``key=value`` pairs, numbers to 4 significant digits."""
    out = []
    for key, value in values.items():
        if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():  # a numpy scalar
            value = value.item()
        if isinstance(value, float):
            out.append(f"{key}={value:.4g}")
        else:
            out.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    return ", ".join(out) or "-"


def _origin(provenance: Mapping[str, Any]) -> str:
    """One line: when, where and from which commit, from what provenance holds."""
    parts = []
    if provenance.get("started"):
        took = provenance.get("seconds")
        parts.append(
            f"started {provenance['started']}" + (f" ({took:.3g} s)" if isinstance(took, (int, float)) else "")
        )
    if provenance.get("host"):
        parts.append(f"on {provenance['host']}")
    line = " ".join(parts)
    git = provenance.get("git")
    if isinstance(git, Mapping) and git.get("commit"):
        dirty = {True: " with uncommitted changes", None: " (status unknown)"}.get(git.get("dirty"), "")
        line += ("; " if line else "") + f"git {str(git['commit'])[:12]}{dirty}"
    return f"Provenance: {line}" if line else ""
