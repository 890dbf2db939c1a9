"""Heavy steps as actor pools on a real local Ray (the session's, 2 CPUs): loads counted in files.

Each step appends one line per setup()/teardown()/call to a file named in its recipe,
with the process id, so the tests count real loads in real processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from crystallize import (
    BasePlugin,
    ConfigurationError,
    Experiment,
    FrozenContext,
    Pipeline,
    PipelineStep,
    SeedPlugin,
    SerialExecution,
    Treatment,
    pipeline_step,
)

ray = pytest.importorskip("ray")
from crystallize_ray import RayExecution  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(autouse=True)
def _no_pools_left(ray_session):
    """Each test starts and ends with no pool: pools outlive run(), not the test."""
    yield
    RayExecution().shutdown()  # the session's Ray is not crystallize's: it stays up


def _note(path: str, what: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"{what} {os.getpid()}\n")


def _lines(path: Path, what: str) -> list[int]:
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.split()[0] == what]


class Model(PipelineStep):
    """A heavy step whose "model" loads in setup(); it draws from ctx['rng'] and adds a key."""

    heavy = True

    def __init__(self, log: str, scale: float = 2.0, kill_on: int | None = None):
        self.log, self.scale, self.kill_on = log, scale, kill_on

    def setup(self, ctx):
        _note(self.log, "setup")
        self.weights = self.scale

    def teardown(self, ctx):
        _note(self.log, "teardown")

    def __call__(self, data, ctx):
        _note(self.log, "call")
        if ctx["replicate"] == self.kill_on and not os.path.exists(self.log + ".killed"):
            Path(self.log + ".killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the actor dies mid-call
        noise = ctx["rng"].random()
        ctx.add("noise", noise)
        return data * self.weights + noise, {"prediction": data * self.weights + noise}


@pipeline_step()
def score(data, ctx: FrozenContext, *, offset: float = 0.0):
    return data, {"score": data + offset + ctx["noise"] + ctx["rng"].random()}


def _experiment(model, *, backend, treatments=(), **kwargs):
    return Experiment(
        datasource=lambda ctx: float(ctx["replicate"]),
        pipeline=Pipeline([model, score()]),
        plugins=[SeedPlugin(seed=7), backend],
        treatments=list(treatments),
        name="pools",
        **kwargs,
    )


def test_a_heavy_step_loads_once_per_actor_never_in_the_driver_and_results_equal_serial(tmp_path):
    log = tmp_path / "model.log"
    treatments = [Treatment("shifted", {"offset": 10.0})]
    backend = RayExecution(heavy={"Model": {"pool_size": 2, "num_cpus": 0.5}})
    on_ray = _experiment(Model(str(log)), backend=backend, treatments=treatments).run(replicates=8)
    assert on_ray.errors == []
    loads = _lines(log, "setup")
    assert len(loads) == 2, "a pool of 2 actors loads the model exactly twice"
    assert os.getpid() not in loads and os.getpid() not in _lines(log, "call")
    assert len(_lines(log, "call")) == 16

    serial_log = tmp_path / "serial.log"
    serial = _experiment(Model(str(serial_log)), backend=SerialExecution(), treatments=treatments).run(replicates=8)
    assert on_ray.metrics.baseline.metrics == serial.metrics.baseline.metrics
    assert on_ray.metrics.treatments["shifted"].metrics == serial.metrics.treatments["shifted"].metrics

    served = {run.provenance[0].served_by for run in on_ray.runs}
    assert len(served) == 2 and all("actor=" in s and "node=" in s for s in served)
    assert {run.provenance[0].added for run in on_ray.runs} == {("noise",)}
    assert {run.provenance[1].served_by for run in on_ray.runs} == {None}  # the light step ran in the task


def test_the_default_pool_leaves_a_cpu_for_the_runs(tmp_path):
    log = tmp_path / "model.log"
    result = _experiment(Model(str(log)), backend=RayExecution()).run(replicates=6)
    assert result.errors == []
    assert len(_lines(log, "setup")) == 1  # 2 CPUs: one actor, one CPU for the tasks

    small = tmp_path / "small.log"
    _experiment(Model(str(small)), backend=RayExecution(heavy={"Model": {"num_cpus": 0.25}})).run(replicates=3)
    assert len(_lines(small, "setup")) == 3  # as many as fit, but never more than the runs


def test_pools_are_reused_across_runs_retired_when_the_recipe_changes_and_torn_down_at_shutdown(tmp_path):
    log = tmp_path / "model.log"
    backend = RayExecution(heavy={"Model": {"pool_size": 1}})
    for _ in range(3):
        assert _experiment(Model(str(log)), backend=backend).run(replicates=4).errors == []
    assert len(_lines(log, "setup")) == 1 and _lines(log, "teardown") == []

    for scale in (3.0, 4.0):  # a new recipe: the old pool is retired, its teardown() runs
        assert _experiment(Model(str(log), scale=scale), backend=backend).run(replicates=2).errors == []
    setups, teardowns = _lines(log, "setup"), _lines(log, "teardown")
    assert (len(setups), len(teardowns)) == (3, 2)  # resident copies: 1, the pool size

    backend.shutdown()
    assert sorted(_lines(log, "teardown")) == sorted(setups)
    assert ray.is_initialized()  # the session's Ray is not crystallize's to stop


def test_an_actor_killed_mid_call_is_replaced_and_no_run_is_lost_or_duplicated(tmp_path):
    log = tmp_path / "model.log"
    model = Model(str(log), kill_on=3)
    backend = RayExecution(heavy={"Model": {"pool_size": 2, "num_cpus": 0.5}})
    result = _experiment(model, backend=backend).run(replicates=10)
    assert Path(str(log) + ".killed").exists(), "the actor never died"
    assert result.errors == []
    assert sorted(r.replicate for r in result.runs) == list(range(10))
    serial = _experiment(Model(str(tmp_path / "serial.log")), backend=SerialExecution()).run(replicates=10)
    assert result.metrics.baseline.metrics == serial.metrics.baseline.metrics
    assert len(_lines(log, "setup")) == 3  # two actors, and the killed one's restart


class Broken(PipelineStep):
    heavy = True

    def __init__(self, log: str):
        self.log = log

    def setup(self, ctx):
        _note(self.log, "setup")
        raise FileNotFoundError("no weights at /models/missing.pt")

    def __call__(self, data, ctx):
        return data


def test_a_failing_setup_fails_fast_naming_the_step_on_every_run(tmp_path):
    log = tmp_path / "broken.log"
    result = Experiment(
        lambda ctx: 0,
        Pipeline([Broken(str(log))]),
        name="broken",
        plugins=[RayExecution(heavy={"Broken": {"pool_size": 1}})],
    ).run(replicates=5)
    assert len(result.errors) == 5
    assert {(e.step, e.type) for e in result.errors} == {("Broken.setup", "FileNotFoundError")}
    assert "no weights at /models/missing.pt" in result.errors[0].message
    assert "3 attempt" in result.errors[0].message
    assert len(_lines(log, "setup")) == 3  # a few attempts, then it stops


def test_pools_that_would_leave_no_cpu_for_the_runs_say_so_instead_of_waiting(tmp_path):
    backend = RayExecution(heavy={"Model": {"pool_size": 2}})  # 2 actors x 1 CPU, on 2 CPUs
    result = _experiment(Model(str(tmp_path / "model.log")), backend=backend).run(replicates=2)
    assert {(e.step, e.type) for e in result.errors} == {("Model.setup", "PoolPlacementError")}
    assert "leaving none for the runs' tasks" in result.errors[0].message


def test_a_pool_that_cannot_be_placed_says_which_resource_is_missing(tmp_path):
    backend = RayExecution(heavy={"Model": {"num_gpus": 1}}, placement_timeout=1)
    result = _experiment(Model(str(tmp_path / "model.log")), backend=backend).run(replicates=3)
    assert len(result.errors) == 3
    error = result.errors[0]
    assert (error.step, error.type) == ("Model.setup", "PoolPlacementError")
    assert "GPU=1" in error.message and "0 GPU" in error.message
    assert not (tmp_path / "model.log").exists()


class CachedModel(PipelineStep):
    heavy = True
    cacheable = True

    def __init__(self, log: str):
        self.log = log

    def __call__(self, data, ctx):
        _note(self.log, "call")
        return data, {"doubled": data * 2}


def test_a_cacheable_heavy_step_is_looked_up_before_any_actor_call(tmp_path):
    log = tmp_path / "cached.log"
    exp = Experiment(
        lambda ctx: ctx["replicate"] % 2,
        Pipeline([CachedModel(str(log))]),
        name="cached",
        plugins=[RayExecution(heavy={"CachedModel": {"pool_size": 1}})],
        cache=str(tmp_path / "cache"),
    )
    first = exp.run(replicates=4)
    calls = len(_lines(log, "call"))
    assert first.errors == [] and 2 <= calls <= 4  # two inputs; concurrent misses may both compute
    second = exp.run(replicates=4)
    assert len(_lines(log, "call")) == calls
    assert {r.provenance[0].cache for r in second.runs} == {"hit"}
    assert {r.provenance[0].served_by for r in second.runs} == {None}
    assert second.metrics.baseline.metrics == first.metrics.baseline.metrics == {"doubled": [0, 2, 0, 2]}


class ArrayModel(PipelineStep):
    heavy = True

    def __call__(self, data, ctx):
        return data * 2, {"total": float(data.sum())}


def test_arrays_go_to_the_pool_and_back(tmp_path):
    np = pytest.importorskip("numpy")
    exp = Experiment(
        lambda ctx: np.full(500_000, float(ctx["replicate"])),
        Pipeline([ArrayModel(), total()]),
        name="arrays",
        plugins=[RayExecution()],
    )
    result = exp.run(replicates=3)
    assert result.errors == []
    assert result.metrics.baseline.metrics["total"] == [0.0, 500_000.0, 1_000_000.0]
    assert result.metrics.baseline.metrics["after"] == [0.0, 1_000_000.0, 2_000_000.0]


@pipeline_step()
def total(data):
    return data, {"after": float(data.sum())}


@pipeline_step()
async def nap(data, ctx: FrozenContext, *, log: str):
    started = time.time()
    await asyncio.sleep(0.5)
    with open(log, "a") as fh:
        fh.write(f"{started} {time.time()}\n")
    return data


def test_async_runs_share_a_workers_event_loop(tmp_path):
    log = str(tmp_path / "spans.log")
    result = Experiment(lambda ctx: 0, Pipeline([nap(log=log)]), name="naps", plugins=[RayExecution()]).run(
        replicates=20
    )
    assert result.errors == []
    spans = [tuple(map(float, line.split())) for line in Path(log).read_text().splitlines()]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap >= 10, f"only {overlap} of 20 async runs overlapped on 2 CPUs"


@pipeline_step()
def slow_on(data, ctx: FrozenContext, *, log: str, target: int = 1):
    _note(log, f"start{ctx['replicate']}")
    time.sleep(60 if ctx["replicate"] == target else 0.05)
    return data, {"ok": 1}


def test_a_run_past_its_timeout_is_recorded_in_its_step_and_its_worker_replaced(tmp_path):
    log = tmp_path / "runs.log"
    started = time.monotonic()
    result = Experiment(
        lambda ctx: 0, Pipeline([slow_on(log=str(log))]), name="slow", plugins=[RayExecution(timeout=2)]
    ).run(replicates=4)
    assert time.monotonic() - started < 30
    assert [(e.replicate, e.step, e.type) for e in result.errors] == [(1, "slow_on", "TimeoutError")]
    assert "2 s timeout" in result.errors[0].message and "time.sleep" in result.errors[0].traceback
    assert result.metrics.baseline.metrics["ok"] == [1, 1, 1]
    (pid,) = _lines(log, "start1")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the worker of the timed-out run is still alive"


class Leaky(PipelineStep):
    """A light class step: its setup()/teardown() happen in each worker process."""

    def __init__(self, log: str):
        self.log = log

    def setup(self, ctx):
        _note(self.log, "setup")

    def teardown(self, ctx):
        _note(self.log, "teardown")

    def __call__(self, data, ctx):
        _note(self.log, "call")
        return data


def test_max_runs_per_worker_replaces_workers_after_tearing_their_steps_down(tmp_path):
    log = tmp_path / "leaky.log"
    result = Experiment(
        lambda ctx: 0, Pipeline([Leaky(str(log))]), name="leaky", plugins=[RayExecution(max_runs_per_worker=2)]
    ).run(replicates=6)
    assert result.errors == []
    calls = _lines(log, "call")
    assert len(calls) == 6 and max(calls.count(pid) for pid in calls) <= 2
    spent = {pid for pid in calls if calls.count(pid) == 2}
    assert spent, "no worker reached its limit; the test shows nothing"
    assert spent <= set(_lines(log, "teardown"))  # torn down before Ray replaced them
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in spent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in spent)


def test_a_worker_keeps_one_experiment_set_up(tmp_path):
    log = tmp_path / "leaky.log"
    backend = RayExecution()
    for _ in range(4):
        assert (
            Experiment(lambda ctx: 0, Pipeline([Leaky(str(log))]), name="leaky", plugins=[backend])
            .run(replicates=6)
            .errors
            == []
        )
    setups, teardowns = _lines(log, "setup"), _lines(log, "teardown")
    resident = {pid: setups.count(pid) - teardowns.count(pid) for pid in setups}
    assert max(resident.values()) == 1, f"a worker kept several experiments' steps: {resident}"
    assert len(setups) > len(set(setups)), "no worker ran two experiments; the test shows nothing"


def test_a_working_dir_when_ray_is_already_up_says_where_to_put_it(tmp_path):
    exp = Experiment(
        lambda ctx: 0,
        Pipeline([score()]),
        name="env",
        plugins=[RayExecution(runtime_env={"working_dir": str(tmp_path)})],
    )
    with pytest.raises(ConfigurationError, match=r"working_dir.*ray\.init"):
        exp.run(replicates=1)


def test_pool_options_are_checked_when_the_backend_is_built():
    with pytest.raises(ConfigurationError, match="heavy"):
        RayExecution(heavy={"Model": {"pool_sise": 2}})
    with pytest.raises(ConfigurationError, match="heavy"):
        RayExecution(heavy={"Model": {"num_gpus": -1}})
    with pytest.raises(ConfigurationError, match="timeout"):
        RayExecution(timeout=0)


class _Arrivals(BasePlugin):
    """When each run's result reaches the driver (where the journal and a Ctrl-C see it)."""

    def __init__(self):
        self.times = []

    def on_run_result(self, experiment, run):
        self.times.append(time.monotonic())


class Slow(PipelineStep):
    heavy = True

    def __call__(self, data, ctx):
        time.sleep(0.2)
        return data, {"y": data}


def test_runs_waiting_on_a_pool_come_back_as_the_pool_serves_them():
    # One actor serves one call at a time. A task holding many of its runs would return
    # them together at its end: the driver, its journal and a Ctrl-C would see none of
    # the finished ones until then.
    arrivals = _Arrivals()
    backend = RayExecution(heavy={"Slow": {"pool_size": 1}})
    result = Experiment(
        lambda ctx: ctx["replicate"], Pipeline([Slow()]), name="arrivals", plugins=[backend, arrivals]
    ).run(replicates=20)
    assert result.errors == [] and len(arrivals.times) == 20
    burst = max(sum(1 for t in arrivals.times if start <= t < start + 0.1) for start in arrivals.times)
    assert burst <= 4, f"{burst} of 20 runs reached the driver within 0.1 s: held back in one task"
