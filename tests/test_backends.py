"""Local backends: serial, thread and process pools, asyncio; shipping experiments to
worker processes once; unpicklable experiments; failing and dying workers."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter

import pytest
from _counting import Lifecycle

from crystallize import (
    AsyncExecution,
    BasePlugin,
    Experiment,
    ParallelExecution,
    Pipeline,
    PipelineStep,
    RunSpec,
    SeedPlugin,
    SerialExecution,
    SerializationError,
    Treatment,
    data_source,
    pipeline_step,
)

# ------------------------------------------------------------ module-level steps


@pipeline_step()
def record_replicate(data, ctx, *, offset: int = 0):
    ctx.metrics.add("value", ctx["replicate"] + offset)
    ctx.metrics.add("pid", os.getpid())
    return data


@pipeline_step()
async def slow_io(data, ctx, *, delay: float = 0.2):
    await asyncio.sleep(delay)
    ctx.metrics.add("done", ctx["replicate"])
    return data


@pipeline_step()
def fail_on(data, ctx, *, bad: int = 2):
    if ctx["replicate"] == bad:
        raise RuntimeError(f"replicate {bad} is cursed")  # RAISING-LINE
    return data


@pipeline_step()
def crash_once(data, ctx, *, marker: str):
    """Kill the worker process the first time any run gets here."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return data
    os.close(fd)
    os._exit(1)


@pipeline_step()
def crash_on(data, ctx, *, doomed: int):
    """Kill the worker process every time replicate ``doomed`` gets here."""
    if ctx["replicate"] == doomed:
        os._exit(1)
    return data


@pipeline_step()
def apply_transform(data, ctx, *, transform=None):
    ctx.metrics.add("value", transform(ctx["replicate"]))
    return data


@pipeline_step()
def record_lock(data, ctx):
    ctx.metrics.add("value", ctx["replicate"])
    ctx.metrics.add("lock", threading.Lock())
    return data


@data_source
def sized(ctx, n=2):
    return list(range(n))


@pipeline_step()
def total(data, ctx):
    ctx.metrics.add("total", sum(data))
    return data


class UnpickleWitness:
    """Appends this process's pid to a file each time it is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        with open(self.path, "a") as fh:
            fh.write(f"{os.getpid()}\n")


class WitnessStep(PipelineStep):
    def __init__(self, path: str) -> None:
        self.witness = UnpickleWitness(path)

    def __call__(self, data, ctx):
        ctx.metrics.add("pid", os.getpid())
        return data


class LockedStep(PipelineStep):
    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.guard = threading.Lock()

    def __call__(self, data, ctx):
        with open(self.marker, "a") as fh:
            fh.write("ran\n")
        return data


class BrokenSetup(PipelineStep):
    """Its setup() fails, after logging the attempt."""

    def __init__(self, log: str) -> None:
        self.log = log

    def setup(self, ctx):
        with open(self.log, "a") as fh:
            fh.write(f"setup {os.getpid()}\n")
        raise RuntimeError("model file missing")

    def __call__(self, data, ctx):
        with open(self.log, "a") as fh:
            fh.write("call\n")
        return data


class RunSpy(BasePlugin):
    def __init__(self) -> None:
        self.seen = []

    def on_run_result(self, experiment, run):
        self.seen.append((run.replicate, run.condition))


def _touching_source(marker: str):
    def source(ctx):
        with open(marker, "a") as fh:
            fh.write("fetched\n")
        return [1]

    return source


# ---------------------------------------------------------------- construction


def test_unknown_executor_type_rejected():
    with pytest.raises(ValueError, match=r"executor_type='bogus'.*'thread' or 'process'"):
        ParallelExecution(executor_type="bogus")


def test_bad_worker_counts_rejected():
    with pytest.raises(ValueError, match=r"max_workers=0\): max_workers must be"):
        ParallelExecution(max_workers=0)
    with pytest.raises(ValueError, match=r"max_concurrency=0\): max_concurrency must be an integer >= 1"):
        AsyncExecution(max_concurrency=0)


@pipeline_step()
def draw(data, ctx, *, offset: int = 0):
    ctx.metrics.add("draw", ctx["rng"].random() + offset)
    return data


@pytest.mark.parametrize(
    "backend",
    [
        lambda: ParallelExecution(max_workers=2, executor_type="thread"),
        lambda: ParallelExecution(max_workers=2, executor_type="process", batch_size=3),
        lambda: AsyncExecution(),
    ],
    ids=["thread", "process", "async"],
)
def test_execute_yields_each_planned_run_once_with_the_serial_metrics(backend):
    # The contract every backend keeps, asked of execute() itself (run() would hide a
    # lost or doubled run behind its own BackendError): each spec of a shuffled plan
    # comes back exactly once, with what SerialExecution computes for that run.
    exp = Experiment(
        lambda ctx: None,
        Pipeline([draw()]),
        plugins=[SeedPlugin(seed=11)],
        treatments=[Treatment("t", {"offset": 100})],
    )
    plan = [RunSpec(r, c) for r in (4, 0, 6, 3, 1, 5, 2) for c in ("t", "baseline")]
    for plugin in exp.plugins:  # prepared as run() prepares it
        plugin.before_run(exp)
    runs = list(backend().execute(exp, plan))
    assert Counter((run.replicate, run.condition) for run in runs) == Counter(
        (spec.replicate, spec.condition) for spec in plan
    )
    assert [run.error for run in runs] == [None] * len(plan)
    serial = {(run.replicate, run.condition): run.metrics for run in SerialExecution().execute(exp, plan)}
    assert {(run.replicate, run.condition): run.metrics for run in runs} == serial
    assert len({m["draw"][0] for (_, c), m in serial.items() if c == "baseline"}) == 7  # seeds differ


# ------------------------------------------------------------- same results


@pytest.mark.parametrize(
    "backend",
    [
        lambda: SerialExecution(),
        lambda: ParallelExecution(max_workers=2, executor_type="thread"),
        lambda: ParallelExecution(max_workers=2, executor_type="process"),
        lambda: AsyncExecution(),
    ],
    ids=["serial", "thread", "process", "async"],
)
def test_every_backend_returns_the_full_grid_in_replicate_order(backend):
    exp = Experiment(
        lambda ctx: None,
        Pipeline([record_replicate()]),
        plugins=[backend()],
        treatments=[Treatment("t", {"offset": 100})],
        replicates=12,
    )
    result = exp.run()
    assert result.errors == []
    assert len(result.runs) == 24
    assert result.metrics.baseline.metrics["value"] == list(range(12))
    assert result.metrics.treatments["t"].metrics["value"] == [100 + r for r in range(12)]


def test_process_backend_really_uses_other_processes():
    exp = Experiment(
        lambda ctx: None,
        Pipeline([record_replicate()]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        replicates=8,
    )
    pids = set(exp.run().metrics.baseline.metrics["pid"])
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


def test_async_step_under_process_backend():
    exp = Experiment(
        lambda ctx: None,
        Pipeline([slow_io(delay=0.0)]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        replicates=4,
    )
    assert exp.run().metrics.baseline.metrics == {"done": [0, 1, 2, 3]}


# ------------------------------------------------------------------- progress


@pytest.mark.parametrize("executor_type", ["thread", "process"])
def test_progress_line_on_stderr(capsys, executor_type):
    exp = Experiment(
        lambda ctx: None,
        Pipeline([fail_on(bad=1)]),
        name="prog",
        replicates=4,
        plugins=[ParallelExecution(max_workers=2, executor_type=executor_type, progress=True)],
    )
    exp.run()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "crystallize prog: [########################] 4/4 runs (100%)" in captured.err
    assert "1 failed" in captured.err
    assert captured.err.endswith("\n")


def test_no_progress_line_by_default(capsys):
    Experiment(lambda ctx: None, Pipeline([fail_on()]), replicates=3, plugins=[ParallelExecution(max_workers=2)]).run()
    assert capsys.readouterr().err == ""


def test_serial_progress_line(capsys):
    Experiment(
        lambda ctx: None, Pipeline([fail_on()]), replicates=3, name="s", plugins=[SerialExecution(progress=True)]
    ).run()
    assert "crystallize s: [" in capsys.readouterr().err


# ---------------------------------------------------------------------- async


class InFlight:
    """Counts the runs inside a step at once; the most ever seen is ``peak``."""

    lock = threading.Lock()
    now = peak = 0

    @classmethod
    def reset(cls) -> None:
        cls.now = cls.peak = 0

    @classmethod
    def enter(cls) -> None:
        with cls.lock:
            cls.now += 1
            cls.peak = max(cls.peak, cls.now)

    @classmethod
    def leave(cls) -> None:
        with cls.lock:
            cls.now -= 1


@pipeline_step()
async def counted_io(data, ctx):
    InFlight.enter()
    try:
        await asyncio.sleep(0.01)
    finally:
        InFlight.leave()
    ctx.metrics.add("done", ctx["replicate"])
    return data


def test_async_steps_overlap():
    InFlight.reset()
    exp = Experiment(lambda ctx: None, Pipeline([counted_io()]), plugins=[AsyncExecution()], replicates=10)
    result = exp.run()
    assert result.metrics.baseline.metrics == {"done": list(range(10))}
    # every run starts its step before any run's sleep can end: all ten are in flight
    assert (InFlight.peak, InFlight.now) == (10, 0)


@pytest.mark.parametrize("limit", [1, 3])
def test_async_max_concurrency_bounds_overlap(limit):
    InFlight.reset()
    exp = Experiment(
        lambda ctx: None, Pipeline([counted_io()]), plugins=[AsyncExecution(max_concurrency=limit)], replicates=10
    )
    assert exp.run().metrics.baseline.metrics == {"done": list(range(10))}
    assert InFlight.peak == limit


# -------------------------------------------------------------- process shipping


def test_process_backend_ships_the_experiment_once_per_worker(tmp_path):
    witness = tmp_path / "unpickled.txt"
    exp = Experiment(
        lambda ctx: None,
        Pipeline([WitnessStep(str(witness))]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        treatments=[Treatment("t", {"k": 1})],
        replicates=10,
    )
    result = exp.run()
    assert result.errors == [] and len(result.runs) == 20
    unpickled_in = witness.read_text().split()
    assert 1 <= len(unpickled_in) <= 2, unpickled_in
    assert len(set(unpickled_in)) == len(unpickled_in)  # each worker once
    assert str(os.getpid()) not in unpickled_in
    run_pids = {str(p) for run in result.runs for p in run.metrics["pid"]}
    assert run_pids <= set(unpickled_in)


def test_process_workers_set_up_and_tear_down_steps_once_each(tmp_path):
    log = tmp_path / "life.txt"
    Experiment(
        lambda ctx: None,
        Pipeline([Lifecycle(str(log))]),
        replicates=12,
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
    ).run()
    events = [line.split() for line in log.read_text().splitlines()]
    by_pid = {}
    for what, pid in events:
        by_pid.setdefault(pid, []).append(what)
    assert str(os.getpid()) not in by_pid
    assert 1 <= len(by_pid) <= 2
    assert sum(whats.count("call") for whats in by_pid.values()) == 12
    for whats in by_pid.values():  # torn down by the time run() returned
        assert whats[0] == "setup" and whats[-1] == "teardown"
        assert whats.count("setup") == whats.count("teardown") == 1


@pytest.mark.parametrize(
    "backend",
    [
        lambda: SerialExecution(),
        lambda: ParallelExecution(max_workers=2, executor_type="thread"),
        lambda: ParallelExecution(max_workers=2, executor_type="process"),
        lambda: AsyncExecution(),
    ],
    ids=["serial", "thread", "process", "async"],
)
def test_failing_setup_is_recorded_on_every_run_on_every_backend(tmp_path, backend):
    log = tmp_path / "setup.txt"
    exp = Experiment(lambda ctx: None, Pipeline([BrokenSetup(str(log))]), plugins=[backend()], replicates=30)
    result = exp.run()
    assert len(result.runs) == 30 and len(result.errors) == 30
    for error in result.errors:
        assert (error.step, error.type) == ("BrokenSetup.setup", "RuntimeError")
        assert "model file missing" in error.message
    lines = log.read_text().splitlines()
    assert "call" not in lines
    # at most once per worker: not retried run by run as if workers had crashed
    assert 1 <= len(lines) <= 2


def test_unpicklable_experiment_fails_before_any_run(tmp_path):
    marker = tmp_path / "ran.txt"
    spy = RunSpy()
    exp = Experiment(
        _touching_source(str(marker)),
        Pipeline([LockedStep(str(marker))]),
        plugins=[spy, ParallelExecution(max_workers=2, executor_type="process")],
        replicates=3,
    )
    with pytest.raises(
        SerializationError,
        match=r"Step 'LockedStep' could not be pickled for process execution: attribute 'guard' holds a lock",
    ):
        exp.run()
    assert not marker.exists()
    assert spy.seen == []


def test_same_unpicklable_experiment_runs_in_threads(tmp_path):
    marker = tmp_path / "ran.txt"
    exp = Experiment(
        _touching_source(str(marker)),
        Pipeline([LockedStep(str(marker))]),
        plugins=[ParallelExecution(max_workers=2, executor_type="thread")],
        replicates=3,
    )
    assert exp.run().errors == []
    assert marker.read_text().count("ran") == 3


# ---------------------------------------------------------------- worker failures


def test_failing_replicate_under_process_backend_is_recorded(tmp_path):
    exp = Experiment(
        lambda ctx: None,
        Pipeline([fail_on(bad=2), record_replicate()]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        replicates=5,
    )
    result = exp.run()
    assert result.metrics.baseline.metrics["value"] == [0, 1, 3, 4]
    (err,) = result.errors
    assert (err.replicate, err.condition, err.step, err.type) == (2, "baseline", "fail_on", "RuntimeError")
    assert err.message == "replicate 2 is cursed"
    assert "RAISING-LINE" in err.traceback


def test_worker_killed_once_is_retried_and_every_run_kept_once(tmp_path):
    marker = tmp_path / "crashed-once"
    exp = Experiment(
        lambda ctx: None,
        Pipeline([crash_once(marker=str(marker)), record_replicate()]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        treatments=[Treatment("t", {"offset": 100})],
        replicates=6,
    )
    result = exp.run()
    assert marker.exists()  # a worker really died
    assert result.errors == []
    assert sorted((r.replicate, r.condition) for r in result.runs) == sorted(
        (r, c) for r in range(6) for c in ("baseline", "t")
    )
    assert result.metrics.baseline.metrics["value"] == list(range(6))
    assert result.metrics.treatments["t"].metrics["value"] == [100 + r for r in range(6)]
    assert max(r.attempts for r in result.runs) >= 2


def test_worker_that_always_dies_is_recorded_and_the_others_finish():
    exp = Experiment(
        lambda ctx: None,
        Pipeline([crash_on(doomed=3), record_replicate()]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process", max_retries=1)],
        replicates=6,
    )
    result = exp.run()
    assert len(result.runs) == 6
    (err,) = result.errors
    assert (err.replicate, err.condition, err.step, err.type) == (3, "baseline", "worker", "WorkerCrashedError")
    assert "died on each of 2 attempt(s)" in err.message
    assert result.run(3).attempts == 2
    assert result.metrics.baseline.metrics["value"] == [0, 1, 2, 4, 5]


def test_a_killer_run_inside_large_batches_is_found_and_the_rest_complete():
    # 400 runs in batches of 50: the pool breaks with up to 4 batches in flight; the
    # isolation phase halves the guilty batch until only the killer is left.
    exp = Experiment(
        lambda ctx: None,
        Pipeline([crash_on(doomed=137), record_replicate()]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process", batch_size=50, max_retries=1)],
        replicates=400,
    )
    result = exp.run()
    assert [(e.replicate, e.step) for e in result.errors] == [(137, "worker")]
    assert sorted(r.replicate for r in result.runs) == list(range(400))
    assert result.metrics.baseline.metrics["value"] == [r for r in range(400) if r != 137]


# ------------------------------------------------------ results coming back


def test_process_results_holding_a_lambda_param_come_back():
    # initial_ctx travels with cloudpickle; the injected value is in the run's provenance
    exp = Experiment(
        lambda ctx: None,
        Pipeline([apply_transform()]),
        initial_ctx={"transform": lambda x: x * 3},
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        replicates=4,
    )
    result = exp.run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"value": [0, 3, 6, 9]}
    assert result.run(2).provenance[0].params["transform"](5) == 15


def test_process_result_that_cannot_be_pickled_is_a_run_error_not_a_crash():
    exp = Experiment(
        lambda ctx: None,
        Pipeline([record_lock()]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        replicates=3,
    )
    result = exp.run()
    assert len(result.runs) == 3
    assert len(result.errors) == 3
    err = result.errors[0]
    assert (err.step, err.type) == ("result", "SerializationError")
    assert "metric 'lock' holds a value that cannot be pickled" in err.message
    assert result.metrics.baseline.metrics == {}


def test_data_source_factory_with_treatment_under_process_backend():
    exp = Experiment(
        sized,
        Pipeline([total()]),
        treatments=[Treatment("big", {"n": 5})],
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
        replicates=2,
    )
    result = exp.run()
    assert result.metrics.baseline.metrics == {"total": [1, 1]}
    assert result.metrics.treatments["big"].metrics == {"total": [10, 10]}


def test_spawned_workers_run_module_level_steps():
    exp = Experiment(
        sized(n=3),
        Pipeline([record_replicate(), total()]),
        replicates=3,
        plugins=[ParallelExecution(max_workers=2, executor_type="process", start_method="spawn")],
    )
    result = exp.run()
    assert result.errors == []
    assert result.metrics.baseline.metrics["total"] == [3, 3, 3]
    assert os.getpid() not in result.metrics.baseline.metrics["pid"]


def test_arun_with_process_backend():
    exp = Experiment(
        lambda ctx: None,
        Pipeline([record_replicate()]),
        replicates=4,
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
    )
    result = asyncio.run(exp.arun())
    assert result.metrics.baseline.metrics["value"] == [0, 1, 2, 3]


class HeavyModel(PipelineStep):
    """Holds a lock, as a loaded model or client might; heavy, so it ships as a recipe."""

    heavy = True

    def __init__(self, log: str, size: int = 3):
        self.guard = threading.Lock()
        self.size = size
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")

    def __call__(self, data, ctx):
        return data, {"size": self.size, "pid": os.getpid()}


def test_heavy_step_is_rebuilt_once_per_worker_instead_of_pickled(tmp_path):
    log = tmp_path / "builds.log"
    exp = Experiment(
        lambda ctx: 0,
        Pipeline([HeavyModel(str(log), size=5)]),
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
    )
    result = exp.run(replicates=20)
    assert result.errors == []
    assert set(result.metrics.baseline.metrics["size"]) == {5}  # constructor args travelled
    builds = log.read_text().split()
    ran_in = {str(pid) for pid in result.metrics.baseline.metrics["pid"]}
    assert builds[0] == str(os.getpid())  # the user's own instance, in the driver
    rebuilt_in = builds[1:]
    # then once per worker process, never per run, never again in the driver. A worker
    # the pool started may build it and then get no run, so compare sets, not lists.
    assert len(rebuilt_in) == len(set(rebuilt_in)) <= 2
    assert str(os.getpid()) not in rebuilt_in
    assert ran_in <= set(rebuilt_in)


def test_driver_only_parts_are_not_shipped_to_workers():
    from crystallize import Hypothesis, Treatment

    lock = threading.Lock()

    class Watcher(BasePlugin):  # a driver-side plugin holding a lock
        def __init__(self):
            self.lock, self.count = lock, 0

        def on_run_result(self, experiment, run):
            with self.lock:
                self.count += 1

    unpicklable_verifier = lambda b, t, _lock=lock: {"p_value": 0.5}  # noqa: E731
    watcher = Watcher()
    exp = Experiment(
        lambda ctx: None,
        Pipeline([record_replicate()]),
        plugins=[watcher, ParallelExecution(max_workers=2, executor_type="process")],
        treatments=[Treatment("t", {"offset": 1})],
        hypotheses=[Hypothesis(unpicklable_verifier, metrics="value", name="h")],
    )
    result = exp.run(replicates=3)
    assert result.errors == [] and watcher.count == 6
    assert result.get_hypothesis("h").results == {"t": {"p_value": 0.5}}


RECEIVED = threading.Event()


@pipeline_step()
async def waits_for_first_result(data, ctx):
    if ctx["replicate"] == 1:  # runs while replicate 0's result should reach the driver
        for _ in range(200):
            if RECEIVED.is_set():
                break
            await asyncio.sleep(0.01)
        ctx.metrics.add("saw_first_result", RECEIVED.is_set())
    return data


def test_async_backend_streams_results_to_the_driver_as_they_finish():
    class Flag(BasePlugin):
        def on_run_result(self, experiment, run):
            if run.replicate == 0:
                RECEIVED.set()

    RECEIVED.clear()
    exp = Experiment(
        lambda ctx: None, Pipeline([waits_for_first_result()]), plugins=[Flag(), AsyncExecution()], replicates=2
    )
    result = exp.run()
    assert result.run(1).metrics["saw_first_result"] == [True]
