"""RayExecution on a real local Ray (one per session, 2 CPUs): same answers, no lost runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from crystallize import (
    Artifact,
    ArtifactPlugin,
    Experiment,
    FrozenContext,
    Pipeline,
    PipelineStep,
    SeedPlugin,
    SerialExecution,
    SerializationError,
    Treatment,
    hypothesis,
    pipeline_step,
    verifier,
)

ray = pytest.importorskip("ray")
from crystallize_ray import RayExecution  # noqa: E402

pytestmark = pytest.mark.ray


def _append(path: str, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")


@pipeline_step()
def draw(data, ctx: FrozenContext, *, delta: float = 0.0):
    value = sum(data) + delta + ctx.get("rng").random()
    ctx.metrics.add("value", value)
    return data


@pipeline_step()
async def pause(data):
    await asyncio.sleep(0.001)
    return data


@pipeline_step()
def log_call(data, ctx: FrozenContext, *, log: str):
    _append(log, f"{ctx.get('replicate')} {ctx.get('condition')} {os.getpid()}")
    return data


@pipeline_step()
def crash_once(data, ctx: FrozenContext, *, marker: str, target: int = 2):
    if ctx.get("replicate") == target and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)  # the worker process dies mid-run
    return data


@pipeline_step()
def always_crash(data, ctx: FrozenContext, *, target: int = 1):
    if ctx.get("replicate") == target:
        os._exit(1)
    return data


@pipeline_step()
def fail_on(data, ctx: FrozenContext, *, target: int = 1, log: str):
    if ctx.get("replicate") == target:
        _append(log, "raised")
        raise ValueError(f"replicate {target} is bad")
    return data


@pipeline_step()
def task_name(data, ctx: FrozenContext):
    import ray as _ray

    ctx.metrics.add("task", _ray.get_runtime_context().get_task_name())
    ctx.metrics.add("task_id", _ray.get_runtime_context().get_task_id())
    return data


@verifier
def mean_gain(baseline, treatment, *, metric="value"):
    b, t = baseline[metric], treatment[metric]
    return {"gain": sum(t) / len(t) - sum(b) / len(b)}


@hypothesis(verifier=mean_gain(), metrics="value", name="gain")
def by_gain(result):
    return -result["gain"]


def _experiment(*steps, plugins, **kwargs):
    return Experiment(
        datasource=lambda ctx: [1, 2, 3],
        pipeline=Pipeline(list(steps)),
        plugins=plugins,
        name="raytest",
        **kwargs,
    )


def test_same_metrics_as_serial_with_treatments_async_steps_and_hypotheses(ray_session):
    kwargs = dict(treatments=[Treatment("more", {"delta": 1.0})], hypotheses=[by_gain])
    on_ray = _experiment(draw(), pause(), plugins=[SeedPlugin(seed=5), RayExecution()], **kwargs).run(replicates=6)
    serial = _experiment(draw(), pause(), plugins=[SeedPlugin(seed=5), SerialExecution()], **kwargs).run(replicates=6)
    assert on_ray.errors == []
    assert on_ray.metrics.baseline.metrics == serial.metrics.baseline.metrics
    assert on_ray.metrics.treatments["more"].metrics == serial.metrics.treatments["more"].metrics
    assert len(on_ray.metrics.baseline.metrics["value"]) == 6
    assert on_ray.get_hypothesis("gain").results == serial.get_hypothesis("gain").results
    assert [r.seed for r in on_ray.runs] == [r.seed for r in serial.runs]


def test_uses_the_running_ray_and_leaves_it_running_across_two_runs(ray_session, tmp_path):
    backend = RayExecution()
    exp = _experiment(draw(), plugins=[SeedPlugin(seed=1), backend])
    first = exp.run(replicates=3)
    assert ray.is_initialized()
    second = exp.run(replicates=3)
    assert ray.is_initialized()
    assert first.metrics.baseline.metrics == second.metrics.baseline.metrics


def test_each_run_executes_exactly_once_in_a_worker_process(ray_session, tmp_path):
    log = str(tmp_path / "calls.log")
    result = _experiment(log_call(log=log), plugins=[RayExecution()], treatments=[Treatment("t", {"x": 1})]).run(
        replicates=5
    )
    lines = Path(log).read_text().splitlines()
    assert sorted(line.rsplit(" ", 1)[0] for line in lines) == sorted(
        f"{r} {c}" for r in range(5) for c in ("baseline", "t")
    )
    assert os.getpid() not in {int(line.rsplit(" ", 1)[1]) for line in lines}
    assert len(result.runs) == 10 and result.errors == []


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost(ray_session, tmp_path):
    marker = str(tmp_path / "crashed")
    result = _experiment(
        crash_once(marker=marker), draw(), plugins=[SeedPlugin(seed=3), RayExecution(batch_size=1)]
    ).run(replicates=5)
    assert os.path.exists(marker), "the step never killed its worker"
    assert result.errors == []
    assert sorted(r.replicate for r in result.runs) == [0, 1, 2, 3, 4]
    assert len(result.metrics.baseline.metrics["value"]) == 5


def test_a_run_that_keeps_killing_its_worker_is_recorded_and_the_others_finish(ray_session):
    result = _experiment(always_crash(target=1), draw(), plugins=[SeedPlugin(seed=3), RayExecution(max_retries=1)]).run(
        replicates=4
    )
    assert [(e.replicate, e.step, e.type) for e in result.errors] == [(1, "worker", "WorkerCrashedError")]
    assert "died" in result.errors[0].message
    assert sorted(r.replicate for r in result.runs) == [0, 1, 2, 3]
    assert len(result.metrics.baseline.metrics["value"]) == 3


def test_a_step_error_is_recorded_and_not_retried_unless_asked(ray_session, tmp_path):
    log = str(tmp_path / "raised.log")
    result = _experiment(fail_on(log=log), plugins=[RayExecution()]).run(replicates=3)
    assert [(e.replicate, e.step, e.type) for e in result.errors] == [(1, "fail_on", "ValueError")]
    assert "replicate 1 is bad" in result.errors[0].traceback
    assert Path(log).read_text().count("raised") == 1

    Path(log).unlink()
    retried = _experiment(fail_on(log=log), plugins=[RayExecution(retry_errors=2)]).run(replicates=3)
    assert Path(log).read_text().count("raised") == 3
    assert retried.run(1).attempts == 3 and len(retried.errors) == 1


class HoldsLock(PipelineStep):
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, data, ctx):
        return data


def test_unpicklable_experiment_fails_before_any_task(ray_session, tmp_path):
    log = str(tmp_path / "calls.log")
    exp = _experiment(log_call(log=log), HoldsLock(), plugins=[RayExecution()])
    with pytest.raises(SerializationError, match=r"Step 'HoldsLock'.*attribute 'lock'.*setup\(\)"):
        exp.run(replicates=2)
    assert not os.path.exists(log)


def test_tasks_carry_readable_names_and_tiny_runs_are_batched(ray_session):
    single = _experiment(task_name(), plugins=[RayExecution(batch_size=1)]).run(replicates=3)
    names = single.metrics.baseline.metrics["task"]
    assert names == [f"crystallize:raytest r={r} baseline" for r in range(3)]

    batched = _experiment(task_name(), plugins=[RayExecution()]).run(replicates=400)
    tasks = set(batched.metrics.baseline.metrics["task_id"])
    assert len(batched.runs) == 400 and batched.errors == []
    assert len(tasks) < 200, f"400 tiny runs took {len(tasks)} tasks; adaptive batching did not engage"


@pipeline_step()
def stamp(data, ctx: FrozenContext, *, log: str):
    start = time.time()
    time.sleep(0.3)
    _append(log, f"{start} {time.time()}")
    return data


def test_in_flight_tasks_are_bounded(ray_session, tmp_path):
    log = str(tmp_path / "spans.log")
    backend = RayExecution(num_cpus=0.25, max_in_flight=2, batch_size=1)
    _experiment(stamp(log=log), plugins=[backend]).run(replicates=8)
    spans = [tuple(map(float, line.split())) for line in Path(log).read_text().splitlines()]
    assert len(spans) == 8
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap <= 2


@pipeline_step(cacheable=True)
def expensive(data, ctx: FrozenContext, *, log: str, factor: float = 1.0):
    _append(log, "computed")
    ctx.metrics.add("scaled", sum(data) * factor)
    return [x * factor for x in data]


def test_cache_on_ray_reuses_outputs_and_replays_metrics(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = str(tmp_path / "calls.log")
    exp = _experiment(expensive(log=log), plugins=[RayExecution()], treatments=[Treatment("double", {"factor": 2.0})])
    first = exp.run(replicates=2)
    assert Path(log).read_text().count("computed") == 2  # one per condition: same input
    second = exp.run(replicates=2)
    assert Path(log).read_text().count("computed") == 2
    assert second.metrics.baseline.metrics["scaled"] == [6.0, 6.0]
    assert second.metrics.treatments["double"].metrics["scaled"] == [12.0, 12.0]
    assert first.metrics.treatments["double"].metrics == second.metrics.treatments["double"].metrics
    assert (tmp_path / ".cache").is_dir()
    assert {r.provenance[0].cache for r in second.runs} == {"hit"}


@pipeline_step()
def report(data, ctx: FrozenContext):
    Artifact("reports/sum.txt").write(f"{sum(data)} {ctx.get('replicate')}")
    return data


def test_artifacts_are_written_by_the_driver(ray_session, tmp_path):
    root = tmp_path / "arts"
    _experiment(report(), plugins=[RayExecution(), ArtifactPlugin(root)]).run(replicates=2)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt"))
    assert files == [f"raytest/v0/baseline/replicate_{r}/reports/sum.txt" for r in range(2)]
    assert (root / "raytest/v0/baseline/replicate_1/reports/sum.txt").read_text() == "6 1"


def test_missing_ray_gives_the_install_command():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from crystallize_ray import RayExecution\n"
        "try:\n    RayExecution()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'crystallize-lab[ray]'" in out.stdout


@pipeline_step()
def leaky_metric(data, ctx: FrozenContext):
    if ctx.get("replicate") == 0:
        ctx.metrics.add("handle", threading.Lock())
    return data, {"ok": 1}


def test_a_result_that_cannot_travel_back_fails_only_its_run(ray_session):
    result = _experiment(leaky_metric(), plugins=[RayExecution(batch_size=3)]).run(replicates=3)
    assert [(e.replicate, e.step, e.type) for e in result.errors] == [(0, "result", "SerializationError")]
    assert "metric 'handle'" in result.errors[0].message
    assert result.metrics.baseline.metrics["ok"] == [1, 1]
