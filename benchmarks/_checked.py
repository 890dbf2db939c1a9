"""Timing an experiment only after checking it really ran: shared by the benchmarks."""

from __future__ import annotations

import time

from crystallize import Experiment

METRIC = "value"


def run_checked(exp: Experiment, runs: int) -> float:
    """Seconds for ``exp.run(replicates=runs)``, after checking every run succeeded.

    A backend must not look fast by failing quickly: every run has to come back
    without error and with its ``value`` metric.
    """
    started = time.perf_counter()
    result = exp.run(replicates=runs)
    seconds = time.perf_counter() - started
    if result.errors:
        raise RuntimeError(f"{exp.name}: {len(result.errors)} of {runs} runs failed, first: {result.errors[0]}")
    values = result.metrics.baseline.metrics.get(METRIC, [])
    if len(values) != runs:
        raise RuntimeError(f"{exp.name}: expected {runs} metric values, got {len(values)}")
    return seconds
