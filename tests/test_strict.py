"""Failures fail the job when asked: run(strict=True) and Result.raise_for_errors()."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from crystallize import (
    AsyncExecution,
    CrystallizeError,
    Experiment,
    ParallelExecution,
    Result,
    RunsFailedError,
    pipeline_step,
)


@pipeline_step()
def fails_on(data, ctx, *, bad: tuple = (1,)):
    if ctx["replicate"] in bad:
        raise ValueError(f"replicate {ctx['replicate']} diverged")  # FAILING-LINE
    return data, {"ok": ctx["replicate"]}


def _exp(bad=(1,), replicates=4, plugins=()):
    return Experiment(
        lambda ctx: None,
        [fails_on(bad=bad)],
        plugins=list(plugins),
        replicates=replicates,
        name="strict",
        journal=False,
    )


@pytest.mark.parametrize(
    "backend", [None, lambda: ParallelExecution(max_workers=2, executor_type="process")], ids=["serial", "process"]
)
def test_strict_run_raises_one_error_for_every_failure_after_every_run_finished(backend):
    with pytest.raises(RunsFailedError) as info:
        _exp(bad=(1, 3), plugins=[backend()] if backend else []).run(strict=True)
    exc = info.value
    assert isinstance(exc, CrystallizeError)
    assert len(exc.result.runs) == 4 and exc.result.metrics.baseline.metrics["ok"] == [0, 2]  # all ran
    assert [(e.replicate, e.step, e.type) for e in exc.errors] == [
        (1, "fails_on", "ValueError"),
        (3, "fails_on", "ValueError"),
    ]
    message = str(exc)
    assert message.startswith("2 of 4 runs of experiment 'strict' failed:")
    assert "replicate 1, condition 'baseline', at fails_on: ValueError: replicate 1 diverged" in message
    assert "replicate 3, condition 'baseline'" in message
    assert "FAILING-LINE" in message  # the first failure's traceback


def test_strict_arun_raises_too():
    with pytest.raises(RunsFailedError, match="1 of 3 runs"):
        asyncio.run(_exp(replicates=3, plugins=[AsyncExecution()]).arun(strict=True))


def test_a_clean_result_passes_and_chains():
    result = _exp(bad=()).run(strict=True)
    assert result.raise_for_errors() is result and result.errors == []


def test_raise_for_errors_on_a_loaded_result_and_the_list_is_capped(tmp_path):
    result = _exp(bad=tuple(range(14)), replicates=15).run()
    result.save(tmp_path / "saved")
    with pytest.raises(RunsFailedError) as info:
        Result.load(tmp_path / "saved").raise_for_errors()
    message = str(info.value)
    assert message.count("\n  - ") == RunsFailedError.LISTED and "... and 4 more" in message
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert str(again) == message and len(again.errors) == 14


def test_without_strict_failures_stay_data():
    result = _exp().run()
    assert len(result.errors) == 1
