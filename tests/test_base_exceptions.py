"""A BaseException raised by a run (sys.exit(), a stray CancelledError, a custom one) fails
that run alone, on every backend; the other runs finish and the experiment returns."""

from __future__ import annotations

import asyncio
import sys

import pytest

from crystallize import (
    AsyncExecution,
    Experiment,
    ParallelExecution,
    Pipeline,
    PipelineStep,
    SerialExecution,
    pipeline_step,
)


class Boom(BaseException):
    """A user's own BaseException, outside the Exception tree."""


def _raise(kind: str) -> None:
    if kind == "exit":
        sys.exit(3)
    if kind == "cancelled":
        raise asyncio.CancelledError("stray cancel from a client library")
    raise Boom("custom base exception")


@pipeline_step()
def explode(data, ctx, *, kind: str = "exit", on: int = 1):
    if ctx["replicate"] == on:
        _raise(kind)
    ctx.metrics.add("value", ctx["replicate"])
    return data


@pipeline_step()
async def aexplode(data, ctx, *, kind: str = "exit", on: int = 1):
    await asyncio.sleep(0)
    if ctx["replicate"] == on:
        _raise(kind)
    ctx.metrics.add("value", ctx["replicate"])
    return data


class ExitingSetup(PipelineStep):
    """A step whose setup() calls sys.exit()."""

    def setup(self, ctx):
        sys.exit("no GPU here")

    def __call__(self, data, ctx):
        return data


def _ray_backend():
    from crystallize_ray import RayExecution

    return RayExecution()


BACKENDS = [
    pytest.param(lambda: SerialExecution(), id="serial"),
    pytest.param(lambda: ParallelExecution(max_workers=2, executor_type="thread"), id="thread"),
    pytest.param(lambda: ParallelExecution(max_workers=2, executor_type="process"), id="process"),
    pytest.param(lambda: AsyncExecution(), id="async"),
    pytest.param(_ray_backend, id="ray", marks=pytest.mark.ray),
]
KINDS = [
    ("exit", "SystemExit", "3"),
    ("cancelled", "CancelledError", "stray cancel from a client library"),
    ("boom", "Boom", "custom base exception"),
]


@pytest.fixture
def uses_ray(request):
    """The session's Ray, for the Ray case only."""
    if request.node.get_closest_marker("ray") is not None:
        request.getfixturevalue("ray_session")


@pytest.mark.parametrize("kind, type_name, message", KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_base_exception_in_a_step_fails_only_its_run(uses_ray, backend, kind, type_name, message):
    exp = Experiment(
        lambda ctx: None, Pipeline([explode(kind=kind, on=1)]), plugins=[backend()], replicates=4, cache=False
    )
    result = exp.run()
    (error,) = result.errors
    assert (error.replicate, error.condition, error.step, error.type) == (1, "baseline", "explode", type_name)
    assert error.message == message
    assert type_name in error.traceback
    assert result.metrics.baseline.metrics["value"] == [0, 2, 3]
    assert sorted(r.replicate for r in result.runs) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind, type_name, message", KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("backend", [BACKENDS[0], BACKENDS[3]])
def test_a_base_exception_in_an_async_step_fails_only_its_run(backend, kind, type_name, message):
    exp = Experiment(
        lambda ctx: None, Pipeline([aexplode(kind=kind, on=2)]), plugins=[backend()], replicates=4, cache=False
    )
    result = exp.run()
    assert [(e.replicate, e.step, e.type) for e in result.errors] == [(2, "aexplode", type_name)]
    assert result.metrics.baseline.metrics["value"] == [0, 1, 3]


@pytest.mark.parametrize("backend", [BACKENDS[1], BACKENDS[3]])
def test_a_stray_cancel_under_arun_fails_only_its_run(backend):
    # Under arun() the caller's task is not being cancelled: the CancelledError is the
    # run's own failure, whether the runs are tasks of the caller's loop (async) or
    # arrive through the default aexecute's helper thread (thread).
    exp = Experiment(
        lambda ctx: None, Pipeline([aexplode(kind="cancelled", on=0)]), plugins=[backend()], replicates=3, cache=False
    )
    result = asyncio.run(exp.arun())
    assert [(e.replicate, e.type) for e in result.errors] == [(0, "CancelledError")]
    assert result.metrics.baseline.metrics["value"] == [1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sys_exit_in_setup_is_recorded_on_every_run(uses_ray, backend):
    exp = Experiment(lambda ctx: None, Pipeline([ExitingSetup()]), plugins=[backend()], replicates=3, cache=False)
    result = exp.run()
    assert len(result.runs) == 3
    assert {(e.step, e.type, e.message) for e in result.errors} == {("ExitingSetup.setup", "SystemExit", "no GPU here")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sys_exit_in_the_datasource_fails_each_run_it_hits(uses_ray, backend):
    def source(ctx):
        if ctx["replicate"] % 2:
            sys.exit(0)
        return [ctx["replicate"]]

    exp = Experiment(source, Pipeline([explode(on=-1)]), plugins=[backend()], replicates=4, cache=False)
    result = exp.run()
    assert [(e.replicate, e.step, e.type) for e in result.errors] == [
        (1, "datasource", "SystemExit"),
        (3, "datasource", "SystemExit"),
    ]
    assert result.metrics.baseline.metrics["value"] == [0, 2]


@pipeline_step()
async def cancel_own_task(data, ctx):
    if ctx["replicate"] == 1:
        asyncio.current_task().cancel()
        await asyncio.sleep(0)
    ctx.metrics.add("value", ctx["replicate"])
    return data


def test_a_run_that_cancels_its_own_task_fails_only_that_run_under_async_execution():
    exp = Experiment(
        lambda ctx: None, Pipeline([cancel_own_task()]), plugins=[AsyncExecution()], replicates=3, cache=False
    )
    result = exp.run()
    assert [(e.replicate, e.type) for e in result.errors] == [(1, "CancelledError")]
    assert result.metrics.baseline.metrics["value"] == [0, 2]
