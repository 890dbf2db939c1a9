"""A picture of a result: each metric's distribution per condition, verdicts on top.

Needs matplotlib (``pip install 'crystallize-lab[plot]'``), imported only when a plot
is drawn. The figure is a plain ``matplotlib.figure.Figure`` made without pyplot: no
display or GUI backend is involved, saving renders with Agg, pyplot's global list of
figures is left alone, and Jupyter shows the figure as a cell's output.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from .treatments import BASELINE

__all__ = ["plot_result"]

log = logging.getLogger("crystallize.plotting")

_PER_ROW = 3


def plot_result(result: Any, metric: str | None = None, path: str | os.PathLike[str] | None = None) -> Any:
    """Draw ``result``: one box plot per numeric metric, conditions side by side.

    Each run's value is drawn as a point over its condition's box. The title names
    the experiment, its runs and failures, and each hypothesis with its ranking and
    the verifier's verdict per treatment. Metrics whose values are not all numbers
    are skipped, with a note at the foot of the figure.

    Args:
        result: a :class:`~crystallize.Result`.
        metric: the metric to draw; ``None`` draws every numeric metric.
        path: where to save the figure (``.png``, ``.svg``, ``.pdf``...), if anywhere.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``metric`` is not a metric of the result or not numeric, or no
            metric is numeric.

    Example:
        >>> from crystallize import Result, RunResult
        >>> result = Result([RunResult(r, "baseline", {"x": [r]}) for r in range(3)], ["baseline"])
        >>> plot_result(result, path="x.png").axes[0].get_title()  # doctest: +SKIP
        'x'
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("Result.plot() needs matplotlib: pip install 'crystallize-lab[plot]'") from exc
    per_condition = [(BASELINE, result.metrics.baseline.metrics)]
    per_condition += [(name, tm.metrics) for name, tm in result.metrics.treatments.items()]
    names = list(dict.fromkeys(m for _, metrics in per_condition for m in metrics))
    numeric = [m for m in names if _all_numbers(v for _, metrics in per_condition for v in metrics.get(m, []))]
    if metric is not None:
        if metric not in names:
            raise ValueError(f"Result.plot(metric={metric!r}): no such metric; the result has {names}.")
        if metric not in numeric:
            raise ValueError(
                f"Result.plot(metric={metric!r}): its values are not all numbers, so there "
                f"is no distribution to draw. Numeric metrics: {numeric}."
            )
        numeric, skipped = [metric], []
    else:
        skipped = [m for m in names if m not in numeric]
    if not numeric:
        raise ValueError(
            f"Result.plot(): no metric has numeric values to draw (metrics: {names}). "
            f"Record numbers with ctx.metrics.add(name, value)."
        )

    cols = min(len(numeric), _PER_ROW)
    rows = math.ceil(len(numeric) / cols)
    width = max(4.0, 0.9 * len(per_condition) + 1.5) * cols
    title = _title(result, int(width * 11))
    fig = Figure(figsize=(width, 3.4 * rows + 0.2 * (title.count("\n") + 1)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, numeric):
        _draw(ax, name, [(c, metrics.get(name, [])) for c, metrics in per_condition])
    for ax in list(axes.flat)[len(numeric) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10, ha="left", x=0.02)
    if skipped:
        note = f"Not drawn (values are not all numbers): {', '.join(skipped)}"
        fig.supxlabel(note, fontsize=8, ha="left", x=0.02, color="0.35")
        log.info("Result.plot(): %s.", note)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


def _all_numbers(values: Any) -> bool:
    seen = False
    for value in values:
        if not isinstance(value, numbers.Real) and type(value).__name__ != "bool_":
            return False
        seen = True
    return seen


def _draw(ax: Any, name: str, data: Sequence[tuple[str, list[Any]]]) -> None:
    positions, boxes = [], []
    for i, (_, values) in enumerate(data, start=1):
        finite = [float(v) for v in values if math.isfinite(float(v))]
        if finite:
            positions.append(i)
            boxes.append(finite)
    if boxes:
        ax.boxplot(
            boxes,
            positions=positions,
            widths=0.5,
            showfliers=False,
            medianprops={"color": "C1"},
            boxprops={"color": "0.3"},
        )
    for pos, values in zip(positions, boxes):
        spread = [(k - (len(values) - 1) / 2) * min(0.3 / max(len(values), 1), 0.06) for k in range(len(values))]
        ax.scatter([pos + s for s in spread], values, s=14, alpha=0.7, color="C0", zorder=3)
    ax.set_xticks(range(1, len(data) + 1))
    ax.set_xticklabels([f"{c}\n(n={len(v)})" for c, v in data], fontsize=8)
    ax.set_xlim(0.4, len(data) + 0.6)
    ax.set_title(name, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _title(result: Any, chars: int) -> str:
    """The experiment's counts, then per hypothesis its ranking with verdicts, wrapped to ``chars``."""
    name = result.provenance.get("name") or "experiment"
    lines = [f"{name}: {len(result.runs)} runs, {len(result.errors)} failed"]
    for h in result.metrics.hypotheses:
        ranked = [f"{t} ({_verdict(h.results.get(t, {}))})" for t in h.ranking]
        ranked += [f"{t} (error)" for t in h.errors]
        line = f"{h.name} on {', '.join(h.metrics)}: " + (" > ".join(ranked) or "nothing ranked")
        lines.extend(textwrap.wrap(line, chars, subsequent_indent="    ", break_on_hyphens=False) or [line])
    return "\n".join(lines)


def _verdict(result: Mapping[str, Any], most: int = 3) -> str:
    """A verifier's scalar answers, e.g. ``p_value=0.012, significant=True``."""
    shown = []
    for key, value in result.items():
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            shown.append(f"{key}={bool(value)}")
        elif isinstance(value, numbers.Real):
            shown.append(f"{key}={float(value):.3g}")
        elif isinstance(value, str) and len(value) <= 20:
            shown.append(f"{key}={value}")
        if len(shown) == most:
            break
    return ", ".join(shown) or "-"
