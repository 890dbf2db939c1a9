"""Hypotheses: compare each treatment's metrics with the baseline's, then rank.

A *verifier* is a statistical test ``fn(baseline, treatment, **params) -> Mapping``,
where ``baseline`` and ``treatment`` map each chosen metric name to its list of
values (replicate order). A *hypothesis* applies one verifier to every treatment and
ranks the treatments with a *ranker* ``ranker(result) -> float`` (lower is better).
"""

from __future__ import annotations

import functools
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .params import rebuild

__all__ = ["Hypothesis", "HypothesisResult", "Verifier", "hypothesis", "verifier"]


class Verifier:
    """A verifier function with its parameters bound; picklable as a recipe."""

    def __init__(self, factory: Callable[..., Verifier], fn: Callable[..., Any], params: dict[str, Any]) -> None:
        self._factory, self.fn, self.params = factory, fn, dict(params)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def __call__(self, baseline: Mapping[str, list[Any]], treatment: Mapping[str, list[Any]]) -> Mapping[str, Any]:
        result = self.fn(baseline, treatment, **self.params)
        if not isinstance(result, Mapping):
            raise TypeError(
                f"Verifier {self.name!r} must return a mapping such as "
                f"{{'p_value': 0.01, 'significant': True}}, got {type(result).__name__}."
            )
        return dict(result)

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (self._factory, self.params))

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


def verifier(fn: Callable[..., Any]) -> Callable[..., Verifier]:
    """Turn ``fn(baseline, treatment, **params)`` into a factory of :class:`Verifier`.

    Example:
        >>> @verifier
        ... def mean_increase(baseline, treatment, *, metric="score", margin=0.0):
        ...     b = sum(baseline[metric]) / len(baseline[metric])
        ...     t = sum(treatment[metric]) / len(treatment[metric])
        ...     return {"difference": t - b, "accepted": t - b > margin}
        >>> check = mean_increase(margin=0.5)
        >>> check({"score": [1, 1]}, {"score": [2, 2]})["accepted"]
        True
    """

    @functools.wraps(fn)
    def factory(**params: Any) -> Verifier:
        return Verifier(factory, fn, params)

    factory.__crystallize_function__ = fn  # type: ignore[attr-defined]
    return factory


def _default_ranker(result: Mapping[str, Any]) -> float:
    """Rank by ``p_value`` when the verifier reports one; otherwise all tie."""
    value = result.get("p_value")
    return float(value) if isinstance(value, (int, float)) else 0.0


@dataclass
class HypothesisResult:
    """Per-treatment verifier results and the ranking of one hypothesis.

    Attributes:
        name: the hypothesis name.
        metrics: the metric names it tested.
        results: treatment name -> what the verifier returned.
        errors: treatment name -> error text when the verifier (or ranker) raised.
        ranking: treatment names, best first (by ranker score, lowest first).
        scores: treatment name -> ranker score.
    """

    name: str
    metrics: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    ranking: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> str | None:
        """The top-ranked treatment, or ``None`` when nothing could be ranked."""
        return self.ranking[0] if self.ranking else None

    def get_for_treatment(self, name: str) -> dict[str, Any] | None:
        """The verifier's result for one treatment."""
        return self.results.get(name)


class Hypothesis:
    """One verifier applied to every treatment, plus a ranker.

    Args:
        verifier: a :class:`Verifier` (e.g. ``welch_t_test(alpha=0.05)``) or any
            callable ``(baseline, treatment) -> Mapping``.
        metrics: the metric name(s) passed to the verifier.
        ranker: ``ranker(result) -> float``, lower is better; default ``p_value``.
        name: defaults to the ranker's name, else the verifier's.
    """

    def __init__(
        self,
        verifier: Callable[..., Mapping[str, Any]],
        metrics: str | Sequence[str],
        ranker: Callable[[Mapping[str, Any]], float] | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(verifier):
            raise TypeError(f"Hypothesis verifier must be callable, got {verifier!r}.")
        self.verifier = verifier
        self.metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        if not self.metrics or not all(isinstance(m, str) for m in self.metrics):
            raise TypeError(f"Hypothesis metrics must be a name or a list of names, got {metrics!r}.")
        self.ranker = ranker or _default_ranker
        ranker_name = getattr(ranker, "__name__", None)
        if ranker_name == "<lambda>":
            ranker_name = None
        self.name = name or ranker_name or getattr(verifier, "name", None) or "hypothesis"

    def evaluate(
        self, baseline: Mapping[str, list[Any]], treatments: Mapping[str, Mapping[str, list[Any]]]
    ) -> HypothesisResult:
        """Run the verifier for each treatment; a verifier that raises is recorded."""
        out = HypothesisResult(self.name, list(self.metrics))
        base = {m: list(baseline.get(m, [])) for m in self.metrics}
        for tname, metrics in treatments.items():
            treated = {m: list(metrics.get(m, [])) for m in self.metrics}
            missing = [m for m in self.metrics if not base[m] or not treated[m]]
            if missing:
                out.errors[tname] = (
                    f"Hypothesis {self.name!r}: no values for metric(s) {missing} in the "
                    f"baseline or treatment {tname!r}. Check the step that records them "
                    f"with ctx.metrics.add, and result.errors for failed runs."
                )
                continue
            try:
                result = dict(self.verifier(base, treated))
                out.results[tname] = result
                score = float(self.ranker(result))
                out.scores[tname] = score if not math.isnan(score) else math.inf
            except Exception as exc:
                out.errors[tname] = (
                    f"Hypothesis {self.name!r} failed for treatment {tname!r}: "
                    f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                )
        out.ranking = sorted(out.scores, key=lambda t: out.scores[t])
        return out

    def __repr__(self) -> str:
        return f"Hypothesis({self.name!r}, metrics={self.metrics!r}, verifier={self.verifier!r})"


def hypothesis(
    *, verifier: Callable[..., Mapping[str, Any]], metrics: str | Sequence[str], name: str | None = None
) -> Callable[[Callable[[Mapping[str, Any]], float]], Hypothesis]:
    """Decorate a ranker function to make a :class:`Hypothesis`.

    Example:
        >>> @verifier
        ... def diff(baseline, treatment):
        ...     return {"delta": sum(treatment["x"]) - sum(baseline["x"])}
        >>> @hypothesis(verifier=diff(), metrics="x")
        ... def bigger_is_better(result):
        ...     return -result["delta"]
        >>> bigger_is_better.name
        'bigger_is_better'
    """

    def decorate(ranker: Callable[[Mapping[str, Any]], float]) -> Hypothesis:
        return Hypothesis(verifier=verifier, metrics=metrics, ranker=ranker, name=name)

    return decorate
