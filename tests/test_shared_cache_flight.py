"""Single flight: runs that need one missing entry compute it once; the others wait.

Executions are counted in a file (process workers append to it too). The leases are
real: in-process, lease files in a real cache directory, lease objects in a real S3
bucket; a holder that dies is a real process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _counting import count_call, executions, start_counting
from _processes import run_released_together

from crystallize import (
    AsyncExecution,
    Experiment,
    LocalCacheStore,
    ParallelExecution,
    pipeline_step,
)

ROOT = Path(__file__).resolve().parents[1]
RUNS = 16


@pytest.fixture(autouse=True)
def counter(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALLIZE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CRYSTALLIZE_CACHE_URL", raising=False)
    return start_counting(tmp_path, monkeypatch)


@pipeline_step(cacheable=True)
def expensive(data):
    count_call()
    time.sleep(0.5)
    return [x * 2 for x in data], {"total": sum(data) * 2}


@pipeline_step(cacheable=True)
async def expensive_async(data):
    count_call()
    await asyncio.sleep(0.5)
    return [x * 2 for x in data], {"total": sum(data) * 2}


@pipeline_step(cacheable=True)
def fails_first(data):
    first = count_call() == 0
    time.sleep(0.3)
    if first:
        raise RuntimeError("the first computation fails")
    return data, {"total": sum(data)}


def sweep(step, backend, runs=RUNS) -> Experiment:
    return Experiment(lambda ctx: [1, 2, 3], [step], plugins=[backend], replicates=runs)


def check_computed_once(result, counter) -> None:
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"total": [12] * RUNS}
    records = [run.provenance[0] for run in result.runs]
    assert executions(counter) == 1
    assert sorted(r.cache for r in records) == ["hit"] * (RUNS - 1) + ["miss"]
    waited = [r for r in records if r.waited > 0]
    assert waited and all(r.cache == "hit" for r in waited)  # they waited, then reused it
    assert max(r.waited for r in waited) < 5


BACKENDS = {
    "process": lambda: ParallelExecution(max_workers=4, executor_type="process"),
    "thread": lambda: ParallelExecution(max_workers=8, executor_type="thread"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sixteen_runs_needing_one_slow_step_compute_it_once(backend, counter):
    check_computed_once(sweep(expensive(), BACKENDS[backend]()).run(), counter)
    assert not list(Path(os.environ["CRYSTALLIZE_CACHE_DIR"]).rglob("*.lease*"))  # all released


def test_async_runs_wait_without_blocking_the_event_loop(counter):
    started = time.perf_counter()
    check_computed_once(sweep(expensive_async(), AsyncExecution()).run(), counter)
    assert time.perf_counter() - started < 5  # the waiters yielded; the holder finished


def test_without_single_flight_every_worker_computes(counter, monkeypatch):
    # The control: the same sweep with waiting turned off really does race.
    monkeypatch.setenv("CRYSTALLIZE_CACHE_MAX_WAIT", "0")
    result = sweep(expensive(), BACKENDS["thread"]()).run()
    assert result.errors == [] and executions(counter) >= 2


def test_a_holder_that_fails_lets_a_waiter_compute(counter):
    result = sweep(fails_first(), ParallelExecution(max_workers=4, executor_type="thread"), runs=4).run()
    assert len(result.errors) == 1 and result.errors[0].type == "RuntimeError"
    assert executions(counter) == 2  # the failure, then one waiter that took the lease over
    statuses = sorted(run.provenance[0].cache for run in result.runs if run.error is None)
    assert statuses == ["hit", "hit", "miss"]


def test_waiting_is_bounded(counter, monkeypatch, caplog):
    monkeypatch.setenv("CRYSTALLIZE_CACHE_MAX_WAIT", "0.3")

    @pipeline_step(cacheable=True)
    def very_slow(data):
        count_call()
        time.sleep(2.0)
        return data, {"total": sum(data)}

    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = sweep(very_slow(), ParallelExecution(max_workers=2, executor_type="thread"), runs=2).run()
    assert result.errors == [] and executions(counter) == 2
    waiter = max((run.provenance[0] for run in result.runs), key=lambda r: r.waited)
    assert waiter.cache == "miss" and 0.25 < waiter.waited < 1.5
    assert "computing it here instead" in caplog.text


HOLDER = """\
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import flight_steps
from crystallize import FrozenContext, Pipeline
Pipeline([flight_steps.slow()]).run([1, 2, 3], FrozenContext())
"""

STEPS = """\
import os, time
from pathlib import Path
from crystallize import pipeline_step

@pipeline_step(cacheable=True)
def slow(data):
    with open(os.environ["CRYSTALLIZE_TEST_COUNTER"], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    Path(os.environ["INSIDE"]).touch()
    time.sleep(float(os.environ.get("STEP_SECONDS", "0.5")))
    return data, {"total": sum(data)}
"""


def _steps(tmp_path: Path):
    mods = tmp_path / "mods"
    mods.mkdir(exist_ok=True)
    (mods / "flight_steps.py").write_text(STEPS)
    sys.path.insert(0, str(mods))
    import flight_steps

    return mods, flight_steps


@pytest.fixture
def flight_steps(tmp_path):
    mods, module = _steps(tmp_path)
    yield mods, module
    sys.path.remove(str(mods))
    sys.modules.pop("flight_steps", None)


def test_the_lease_of_a_killed_holder_lapses_and_a_waiter_computes(flight_steps, counter, tmp_path, monkeypatch):
    mods, module = flight_steps
    inside = tmp_path / "inside"
    monkeypatch.setenv("CRYSTALLIZE_CACHE_LEASE_SECONDS", "1")
    monkeypatch.setenv("INSIDE", str(inside))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(mods)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "STEP_SECONDS": "60"},
    )
    try:
        deadline = time.monotonic() + 60
        while not inside.exists():
            assert time.monotonic() < deadline and holder.poll() is None, "the holder never started"
            time.sleep(0.01)
        assert list((tmp_path / "cache").rglob("*.lease.pkl"))  # it holds the lease
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: no release
        holder.wait()
        result = sweep(module.slow(), ParallelExecution(max_workers=1, executor_type="thread"), runs=1).run()
    finally:
        if holder.poll() is None:
            holder.kill()
    record = result.runs[0].provenance[0]
    assert result.errors == [] and record.cache == "miss"
    assert 0 < record.waited < 5  # waited for the lease to lapse (1 s), not for the step (60 s)
    assert executions(counter) == 2


DRIVER = """\
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import flight_steps
from crystallize import Experiment
Path(os.environ["READY_DIR"], str(os.getpid())).touch()
while not Path(os.environ["GATE"]).exists():
    time.sleep(0.002)
result = Experiment(lambda ctx: [1, 2, 3], [flight_steps.slow()], replicates=2).run()
record = result.runs[0].provenance[0]
print(json.dumps({"cache": record.cache, "waited": record.waited}))
"""


def test_jobs_sharing_a_bucket_compute_a_missing_entry_once(flight_steps, s3_bucket, counter, tmp_path):
    mods, _ = flight_steps
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    ready.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CRYSTALLIZE_CACHE_URL": f"s3://{s3_bucket}/jobs",
        "READY_DIR": str(ready),
        "GATE": str(gate),
        "INSIDE": str(tmp_path / "inside"),
    }
    env.pop("CRYSTALLIZE_CACHE_DIR")  # each job reads through its own ./.cache
    command = [sys.executable, "-c", DRIVER, str(mods)]
    outs = run_released_together(command, [tmp_path / f"job{i}" for i in range(3)], env, ready, gate, what="jobs")
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert executions(counter) == 1
    assert sorted(r["cache"] for r in reports) == ["hit", "hit", "miss"]
    # A job slow to start (a loaded machine) may find the entry already stored and hit
    # without waiting; at least one of the two released with the computing job waited.
    assert any(r["waited"] > 0 for r in reports if r["cache"] == "hit")


def test_a_cache_store_without_leases_still_has_single_flight_in_process(counter):
    class PlainStore:
        """A store with only the four required methods."""

        def __init__(self) -> None:
            self.inner = LocalCacheStore(os.environ["CRYSTALLIZE_CACHE_DIR"])

        def get(self, namespace, key):
            return self.inner.get(namespace, key)

        def put(self, namespace, key, blob):
            self.inner.put(namespace, key, blob)

        def contains(self, namespace, key):
            return self.inner.contains(namespace, key)

        def delete(self, namespace, key):
            self.inner.delete(namespace, key)

        def __repr__(self) -> str:
            return "PlainStore()"

    exp = sweep(expensive(), BACKENDS["thread"]())
    exp.cache = PlainStore()
    check_computed_once(exp.run(), counter)
