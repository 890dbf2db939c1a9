"""timeout= stops a run that hangs, names its step, and lets the others finish;
max_runs_per_worker= replaces worker processes, so a step that leaks cannot grow one.

Hanging steps really hang (a minute of sleep, a busy loop, a blocked data source); the
tests check the records, the counts of runs and that the stuck worker is gone.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from _counting import Lifecycle

from crystallize import (
    AsyncExecution,
    ConfigurationError,
    Experiment,
    ParallelExecution,
    Pipeline,
    SerialExecution,
    pipeline_step,
)

HANG_SECONDS = 60


@pipeline_step()
def prepare(data, ctx):
    return data


@pipeline_step()
def hang(data, ctx, *, at: int = 2, pids: str = "", busy: bool = False):
    if ctx["replicate"] == at:
        if pids:
            with open(pids, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + HANG_SECONDS
        while time.monotonic() < deadline:
            if not busy:
                time.sleep(HANG_SECONDS)  # HANGS-HERE
    ctx.metrics.add("value", ctx["replicate"])
    return data


@pipeline_step()
async def ahang(data, ctx, *, at: int = 2):
    if ctx["replicate"] == at:
        await asyncio.sleep(HANG_SECONDS)  # AWAITS-HERE
    ctx.metrics.add("value", ctx["replicate"])
    return data


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _check(result, step: str, at: int = 2, replicates: int = 6) -> None:
    (error,) = result.errors
    assert (error.replicate, error.step, error.type) == (at, step, "TimeoutError")
    assert f"exceeded its 1 s timeout in step {step!r}" in error.message
    assert result.metrics.baseline.metrics.get("value", []) == [r for r in range(replicates) if r != at]
    assert sorted(r.replicate for r in result.runs) == list(range(replicates))


@pytest.mark.parametrize("busy", [False, True], ids=["sleeping", "busy-loop"])
def test_a_hanging_step_on_the_process_pool_is_stopped_named_and_its_worker_replaced(tmp_path, busy):
    pids = tmp_path / "pids.txt"
    exp = Experiment(
        lambda ctx: None,
        Pipeline([prepare(), hang(at=2, pids=str(pids), busy=busy)]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process", timeout=1)],
        replicates=6,
        journal=False,
    )
    result = exp.run()
    _check(result, "hang")
    (error,) = result.errors
    assert f"{Path(__file__).name}:" in error.message or "<dynamic-code>" in error.message
    assert "in hang" in error.message and "in hang" in error.traceback  # the stack it was stopped in
    (pid,) = map(int, pids.read_text().split())
    assert not _alive(pid)  # the stuck worker was killed, not left running


def test_a_hanging_data_source_is_named_as_the_data_source(tmp_path):
    def source(ctx):
        if ctx["replicate"] == 1:
            time.sleep(HANG_SECONDS)
        return None

    exp = Experiment(
        source,
        Pipeline([hang(at=-1)]),
        replicates=4,
        journal=False,
        plugins=[ParallelExecution(max_workers=2, executor_type="process", timeout=1)],
    )
    _check(exp.run(), "datasource", at=1, replicates=4)


def test_runs_within_the_timeout_are_untouched_and_workers_kept(tmp_path):
    @pipeline_step()
    def quick(data, ctx):
        time.sleep(0.05)
        return data, {"pid": os.getpid()}

    result = Experiment(
        lambda ctx: None,
        [quick()],
        replicates=20,
        journal=False,
        plugins=[ParallelExecution(max_workers=2, executor_type="process", timeout=5)],
    ).run()
    assert result.errors == []
    assert len(set(result.metrics.baseline.metrics["pid"])) <= 2


def test_a_hanging_async_step_is_cancelled_and_named(tmp_path):
    exp = Experiment(
        lambda ctx: None,
        Pipeline([prepare(), ahang(at=2)]),
        replicates=6,
        journal=False,
        plugins=[AsyncExecution(timeout=1)],
    )
    started = time.monotonic()
    result = exp.run()
    _check(result, "ahang")
    assert "it was cancelled" in result.errors[0].message
    assert "AWAITS-HERE" in result.errors[0].traceback
    assert time.monotonic() - started < HANG_SECONDS / 2  # nobody waited for the hang


def test_arun_enforces_the_async_timeout_too():
    exp = Experiment(
        lambda ctx: None, Pipeline([ahang(at=0)]), replicates=3, journal=False, plugins=[AsyncExecution(timeout=1)]
    )
    _check(asyncio.run(exp.arun()), "ahang", at=0, replicates=3)


@pytest.mark.ray
@pytest.mark.slow
def test_a_hanging_step_under_ray_is_stopped_and_named(ray_session):
    from crystallize_ray import RayExecution

    if not getattr(RayExecution, "supports_timeout", False):
        pytest.skip("this RayExecution does not take timeout= yet")
    exp = Experiment(
        lambda ctx: None,
        Pipeline([prepare(), hang(at=2)]),
        replicates=6,
        journal=False,
        plugins=[RayExecution(timeout=1)],
    )
    result = exp.run()
    (error,) = result.errors
    assert (error.replicate, error.type) == (2, "TimeoutError")
    assert result.metrics.baseline.metrics["value"] == [0, 1, 3, 4, 5]


def test_backends_that_cannot_stop_a_run_refuse_a_timeout_and_say_what_can():
    with pytest.raises(
        ConfigurationError,
        match=r"SerialExecution\(timeout=5\).*cannot be stopped.*"
        r"ParallelExecution\(executor_type='process', timeout=\.\.\.\)",
    ):
        SerialExecution(timeout=5)
    with pytest.raises(ConfigurationError, match=r"timeout=5\).*a thread cannot be stopped.*executor_type='process'"):
        ParallelExecution(executor_type="thread", timeout=5)
    with pytest.raises(ConfigurationError, match=r"max_runs_per_worker=3\).*threads share this process"):
        ParallelExecution(executor_type="thread", max_runs_per_worker=3)
    for bad in (0, -1, True, float("nan"), "10"):
        with pytest.raises(ConfigurationError, match="timeout must be None or a number of seconds > 0"):
            ParallelExecution(executor_type="process", timeout=bad)
    assert ParallelExecution(executor_type="process", timeout=2).supports_timeout
    assert not ParallelExecution(executor_type="thread").supports_timeout
    assert AsyncExecution(timeout=2).supports_timeout and not SerialExecution().supports_timeout


# ------------------------------------------------------------------- recycling

LEAKED: list = []


@pipeline_step()
def leaky(data, ctx):
    LEAKED.append(bytearray(20 * 2**20))  # 20 MiB this worker never gets back
    with open("/proc/self/statm") as fh:
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return data, {"pid": os.getpid(), "rss": rss}


def test_workers_are_replaced_every_max_runs_per_worker_runs_so_a_leak_stays_bounded():
    exp = Experiment(
        lambda ctx: None,
        [leaky()],
        replicates=12,
        journal=False,
        plugins=[ParallelExecution(max_workers=2, executor_type="process", max_runs_per_worker=2)],
    )
    result = exp.run()
    assert result.errors == []
    pids, rss = result.metrics.baseline.metrics["pid"], result.metrics.baseline.metrics["rss"]
    assert all(pids.count(pid) <= 2 for pid in set(pids))  # no worker served more than 2 runs
    assert len(set(pids)) >= 6
    assert max(rss) - min(rss) < 30  # one leak of 20 MiB at most on top of a fresh worker

    unbounded = Experiment(
        lambda ctx: None,
        [leaky()],
        replicates=12,
        journal=False,
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
    ).run()
    assert max(unbounded.metrics.baseline.metrics["rss"]) - max(rss) > 60  # what recycling prevents


def test_recycled_workers_set_up_and_tear_down_their_steps(tmp_path):
    log = tmp_path / "life.txt"
    Experiment(
        lambda ctx: None,
        [Lifecycle(str(log))],
        replicates=9,
        journal=False,
        plugins=[ParallelExecution(max_workers=2, executor_type="process", max_runs_per_worker=3)],
    ).run()
    by_pid: dict[str, list[str]] = {}
    for what, pid in (line.split() for line in log.read_text().splitlines()):
        by_pid.setdefault(pid, []).append(what)
    calls = [whats.count("call") for whats in by_pid.values()]
    assert sum(calls) == 9 and max(calls) == 3 and len(calls) >= 3  # no worker served more than 3
    assert all(whats[0] == "setup" and whats[-1] == "teardown" for whats in by_pid.values())
