"""Ctrl-C: run() stops promptly on every backend, keeps every finished run in
exc.partial_result, and leaves no worker behind, even when Ctrl-C comes twice.

The signal tests run a real driver process (tests/scripts/interrupt_driver.py) and
send it a real SIGINT; the in-process tests raise KeyboardInterrupt from a step or
from a plugin hook, where Ctrl-C may land as well.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from crystallize import (
    AsyncExecution,
    BasePlugin,
    Experiment,
    ParallelExecution,
    Pipeline,
    Result,
    SerialExecution,
    pipeline_step,
)

SCRIPT = Path(__file__).parent / "scripts" / "interrupt_driver.py"
ROOT = Path(__file__).parents[1]


LOCAL = [
    pytest.param(lambda: SerialExecution(), id="serial"),
    pytest.param(lambda: ParallelExecution(max_workers=2, executor_type="thread"), id="thread"),
    pytest.param(lambda: ParallelExecution(max_workers=2, executor_type="process", batch_size=1), id="process"),
    pytest.param(lambda: AsyncExecution(max_concurrency=2), id="async"),
]


# ------------------------------------------------------------------ in-process


@pipeline_step()
def interrupt_on(data, ctx, *, on: int = 3, seconds: float = 0.0):
    if ctx["replicate"] == on:
        raise KeyboardInterrupt
    time.sleep(seconds)
    ctx.metrics.add("value", ctx["replicate"])
    return data


def test_keyboard_interrupt_from_a_step_stops_serial_run_with_the_finished_runs():
    exp = Experiment(lambda ctx: None, Pipeline([interrupt_on(on=3)]), replicates=6, cache=False)
    with pytest.raises(KeyboardInterrupt) as info:
        exp.run()
    partial = info.value.partial_result
    assert isinstance(partial, Result)
    assert [r.replicate for r in partial.runs] == [0, 1, 2]
    assert partial.errors == []  # the interrupted run is not a failure, and not there
    assert partial.metrics.baseline.metrics["value"] == [0, 1, 2]
    assert partial.provenance["complete"] is False


@pytest.mark.parametrize("backend", LOCAL[1:])
def test_keyboard_interrupt_from_a_step_stops_every_local_backend(backend):
    exp = Experiment(
        lambda ctx: None, Pipeline([interrupt_on(on=3, seconds=0.05)]), plugins=[backend()], replicates=12, cache=False
    )
    with pytest.raises(KeyboardInterrupt) as info:
        exp.run()
    partial = info.value.partial_result
    replicates = [r.replicate for r in partial.runs]
    assert 3 not in replicates and len(replicates) == len(set(replicates)) < 12
    assert partial.errors == []
    assert _live_children() == []  # process workers are gone


class InterruptOnFirstResult(BasePlugin):
    """Ctrl-C landing in the driver while it handles a result (a hook, the progress line)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_run_result(self, experiment, run):
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt


def _hold(replicate: int, release: str) -> float:
    """Replicate 0 is quick, 1 takes 0.3 s, later ones wait for ``release`` (30 s at most)."""
    if replicate < 2:
        return 0.05 if replicate == 0 else 0.3
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return 0.0


@pipeline_step()
def staggered(data, ctx, *, release: str):
    time.sleep(_hold(ctx["replicate"], release))
    ctx.metrics.add("value", ctx["replicate"])
    return data


@pipeline_step()
async def astaggered(data, ctx, *, release: str):
    if ctx["replicate"] < 2:
        await asyncio.sleep(_hold(ctx["replicate"], release))
    else:
        await asyncio.sleep(30)
    ctx.metrics.add("value", ctx["replicate"])
    return data


def _ray_backend():
    from crystallize_ray import RayExecution

    return RayExecution(batch_size=1)


@pytest.mark.parametrize("backend", [*LOCAL, pytest.param(_ray_backend, id="ray", marks=pytest.mark.ray)])
def test_ctrl_c_in_a_result_hook_keeps_the_runs_that_finish_while_stopping(request, tmp_path, backend):
    if request.node.get_closest_marker("ray") is not None:
        request.getfixturevalue("ray_session")
    release = str(tmp_path / "release")
    step = astaggered if request.node.callspec.id == "async" else staggered
    hook = InterruptOnFirstResult()
    exp = Experiment(
        lambda ctx: None, Pipeline([step(release=release)]), plugins=[hook, backend()], replicates=20, cache=False
    )
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            exp.run()
        stopped_after = time.monotonic() - started
        replicates = sorted(r.replicate for r in info.value.partial_result.runs)
        # The run in hand when Ctrl-C struck is kept; replicate 1, in flight then,
        # finished while the backend stopped and is kept too (serial has nothing in
        # flight); the later runs, which would take 30 s, were not waited for.
        if request.node.callspec.id == "serial":
            assert replicates == [0]
        elif request.node.callspec.id == "ray":  # Ray may start replicate 1 late
            assert replicates in ([0], [0, 1])
        else:
            assert replicates == [0, 1]
        assert hook.calls == len(replicates)
        assert stopped_after < 10, f"run() waited {stopped_after:.1f} s for runs in flight"
        assert _live_children() == []
    finally:
        Path(release).touch()  # lets an abandoned thread out of its run
    deadline = time.monotonic() + 2  # worker threads take no new run and exit
    while any(t.name.startswith("crystallize") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("crystallize")]


class SigintOnFirstResult(BasePlugin):
    """A real SIGINT to this process while the first result is handled."""

    def on_run_result(self, experiment, run):
        if run.replicate == 0:
            signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("backend", [LOCAL[3], LOCAL[1]])
def test_ctrl_c_under_asyncio_run_cancels_arun_and_keeps_the_finished_runs(tmp_path, backend):
    # asyncio.run turns Ctrl-C into cancelling its main task, then raises
    # KeyboardInterrupt itself; the cancelled arun() carries the partial result.
    release = str(tmp_path / "release")
    step = astaggered if backend().__class__ is AsyncExecution else staggered
    exp = Experiment(
        lambda ctx: None,
        Pipeline([step(release=release)]),
        plugins=[SigintOnFirstResult(), backend()],
        replicates=20,
        cache=False,
    )
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            asyncio.run(exp.arun())
    finally:
        Path(release).touch()
    assert time.monotonic() - started < 10
    cancelled = info.value.__context__
    assert isinstance(cancelled, asyncio.CancelledError)
    assert sorted(r.replicate for r in cancelled.partial_result.runs) == [0, 1]


def _live_children() -> list[int]:
    # By pid: the pool's own thread may reap a terminated worker a moment before
    # its Process object learns the exit code.
    return [p.pid for p in multiprocessing.active_children() if _alive(p.pid)]


# ---------------------------------------------------------- real SIGINT, real driver


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited already


def _interrupt(backend: str, out: Path, *, signals: int = 1, group: bool = False, env: dict | None = None) -> dict:
    """Start the driver, wait for its two short runs, send SIGINT; report what happened.

    The runs in flight then take a minute each: the driver must not wait for them.
    """
    stdout, stderr = out / "stdout.txt", out / "stderr.txt"
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), backend, str(out)],
            cwd=ROOT,
            stdout=so,
            stderr=se,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + 60
        while _lines(out / "finished.txt") < 2:
            assert proc.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, "no run finished within 60 s"
            time.sleep(0.02)
        time.sleep(0.1)  # the next (long) runs are now inside their step
        finished_before = _lines(out / "finished.txt")
        children = json.loads((out / "children.json").read_text())
        sent = time.monotonic()
        for i in range(signals):
            if i:
                time.sleep(0.2)  # the second Ctrl-C lands while the backend is stopping
            # A terminal sends Ctrl-C to the whole foreground process group.
            (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
        reported_after = None
        while proc.poll() is None and time.monotonic() - sent < 60:
            if reported_after is None and "partial_runs" in stdout.read_text():
                reported_after = time.monotonic() - sent
            time.sleep(0.02)
        exited_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report: dict = {}
    for line in stdout.read_text().splitlines():
        report.update(json.loads(line))
    report.update(
        finished_before=finished_before,
        children=children,
        reported_after=reported_after,
        exited_after=exited_after,
        stderr=stderr.read_text(),
        returncode=proc.returncode,
    )
    return report


def _survivors(pids: list[int], wait: float = 5.0) -> list[int]:
    deadline = time.monotonic() + wait
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize("group", [False, True], ids=["driver", "process-group"])
@pytest.mark.parametrize("backend", ["serial", "thread", "process", "async"])
def test_sigint_stops_the_driver_and_keeps_every_finished_run(tmp_path, backend, group):
    report = _interrupt(backend, tmp_path, group=group)
    assert "partial_runs" in report, report["stderr"][-3000:]
    # It did not wait a minute for the runs in flight, neither in run() nor at exit.
    assert report["reported_after"] < 5, report
    assert report["returncode"] == 0 and report["exited_after"] < 10, report
    assert report["partial_runs"] == report["finished_before"] == 2
    assert report["partial_replicates"] == [0, 1]
    assert report["complete"] is False and report["errors"] == []
    # Nothing started once run() had raised (30 runs were planned)...
    assert report["started_later"] == report["started_at_raise"] <= 4
    assert report["finished_later"] == report["finished_at_raise"]
    # ...and the worker processes were stopped by the backend, not by the exit.
    assert report["children_alive_at_raise"] == []
    assert report["in_flight_workers_alive_later"] == []
    if backend == "process":
        assert len(report["children"]) == 2
    assert _survivors(report["children"]) == []


@pytest.mark.parametrize("backend", ["serial", "thread", "process", "async"])
def test_a_second_sigint_while_stopping_never_hangs(tmp_path, backend):
    report = _interrupt(backend, tmp_path, signals=2)
    assert report["exited_after"] < 10, report
    if "partial_runs" in report:  # the second Ctrl-C may also cut the script's report short
        assert report["partial_replicates"] == [0, 1]
    assert _survivors(report["children"]) == []


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_sigint_under_ray_cancels_the_tasks_and_keeps_every_finished_run(tmp_path, signals):
    pytest.importorskip("ray")
    # The driver starts its own Ray on loopback (address="local") for this test
    # alone; Ray 2.60 turns on token auth for clusters it starts, which only adds
    # setup here, so it is disabled.
    report = _interrupt("ray", tmp_path, signals=signals, env={"RAY_AUTH_MODE": "disabled"})
    assert "partial_runs" in report, report["stderr"][-3000:]
    assert report["reported_after"] < 10, report
    assert report["exited_after"] < 30, report
    assert report["partial_replicates"] == [0, 1]
    assert report["errors"] == [] and report["complete"] is False
    if signals == 1:
        # Queued tasks were cancelled and the workers of running ones killed.
        assert report["started_later"] == report["started_at_raise"] <= 4
        assert report["in_flight_workers_alive_later"] == []
    assert _survivors(report["children"], wait=15) == []
