"""Pipeline: building, running sync and async, errors, metrics and provenance."""

from __future__ import annotations

import asyncio

import pytest

from crystallize import (
    ContextMutationError,
    CrystallizeError,
    FrozenContext,
    Pipeline,
    PipelineError,
    PipelineStep,
    StepError,
    StepRecord,
    pipeline_step,
)


@pipeline_step()
def add(data, *, amount=1):
    return data + amount


@pipeline_step()
def double(data):
    return data * 2


@pipeline_step()
async def async_add(data, *, amount=10):
    await asyncio.sleep(0)
    return data + amount


@pipeline_step()
def explode(data):
    raise ValueError(f"bad value {data}")


@pipeline_step()
async def async_explode(data):
    await asyncio.sleep(0)
    raise ValueError("async failure")


@pipeline_step()
def record_metrics(data, ctx):
    ctx.metrics.add("seen", data)
    return data


@pipeline_step()
def with_metrics_return(data):
    return data, {"total": sum(data), "count": len(data)}


@pipeline_step()
def reads_and_adds(data, ctx):
    scale = ctx.get("scale", 1)
    ctx.add("scaled", True)
    return data * scale


class Negate(PipelineStep):
    def __call__(self, data, ctx):
        return -data


# -- running --------------------------------------------------------------------------


def test_run_applies_steps_in_order():
    assert Pipeline([add(amount=1), double]).run(3) == 8
    assert Pipeline([double, add(amount=1)]).run(3) == 7


def test_run_without_ctx_makes_an_empty_one():
    assert Pipeline([add]).run(1) == 2


def test_ctx_must_be_a_frozen_context():
    with pytest.raises(TypeError, match="FrozenContext"):
        Pipeline([add]).run(1, {"amount": 2})  # type: ignore[arg-type]


def test_mixed_function_and_class_steps():
    assert Pipeline([add, Negate(), double]).run(1) == -4


def test_run_awaits_async_steps():
    pipeline = Pipeline([add, async_add, double])
    assert pipeline.is_async
    assert pipeline.run(0) == 22


def test_arun_awaits_async_steps_and_runs_sync_steps():
    assert asyncio.run(Pipeline([add, async_add, double]).arun(0)) == 22
    assert asyncio.run(Pipeline([add, double]).arun(0)) == 2


def test_sync_pipeline_can_run_inside_a_running_loop():
    async def main():
        return Pipeline([add, double]).run(1)

    assert asyncio.run(main()) == 4


def test_run_inside_a_running_loop_with_async_step_points_to_arun():
    pipeline = Pipeline([async_add])

    async def main():
        with pytest.raises(PipelineError, match=r"arun"):
            pipeline.run(1)
        return await pipeline.arun(1)

    assert asyncio.run(main()) == 11


def test_concurrent_aruns_do_not_share_state():
    pipeline = Pipeline([async_add, record_metrics])

    async def main():
        contexts = [FrozenContext({"amount": i}) for i in range(5)]
        results = await asyncio.gather(*(pipeline.arun(0, c) for c in contexts))
        return results, [c.metrics["seen"] for c in contexts]

    results, seen = asyncio.run(main())
    assert results == [0, 1, 2, 3, 4]
    assert seen == [(0,), (1,), (2,), (3,), (4,)]


# -- building -------------------------------------------------------------------------


def test_empty_pipeline_is_rejected():
    with pytest.raises(PipelineError, match="at least one step"):
        Pipeline([])


def test_non_step_entry_is_rejected_naming_its_position():
    with pytest.raises(PipelineError, match=r"entry 1 is a int \(42\), not a step"):
        Pipeline([add, 42])


def test_a_step_class_instead_of_an_instance_is_rejected():
    with pytest.raises(PipelineError, match=r"class Negate; pass an instance.*Negate\(\)"):
        Pipeline([Negate])


def test_a_plain_function_is_rejected_with_the_fix():
    def plain(data):
        return data

    with pytest.raises(PipelineError, match=r"'plain'.*@pipeline_step"):
        Pipeline([plain])


def test_a_lambda_is_rejected():
    with pytest.raises(PipelineError, match="plain callable"):
        Pipeline([lambda data: data])


def test_steps_must_be_a_list():
    with pytest.raises(PipelineError, match="list of steps"):
        Pipeline(add())  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="list of steps"):
        Pipeline("add")  # type: ignore[arg-type]


def test_pipeline_errors_are_crystallize_errors():
    with pytest.raises(CrystallizeError):
        Pipeline([None])


# -- step failures --------------------------------------------------------------------


def test_a_step_raising_becomes_step_error_with_cause():
    with pytest.raises(StepError, match=r"'explode' \(position 1.*ValueError: bad value 2") as info:
        Pipeline([add, explode, double]).run(1)
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "bad value 2"
    assert info.value.step == "explode"
    assert info.value.index == 1


def test_an_async_step_raising_becomes_step_error_in_run_and_arun():
    with pytest.raises(StepError, match="'async_explode'") as info:
        Pipeline([async_explode]).run(1)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(StepError, match="async failure") as info:
        asyncio.run(Pipeline([add, async_explode]).arun(1))
    assert isinstance(info.value.__cause__, ValueError)


def test_a_step_editing_ctx_fails_with_the_mutation_as_cause():
    @pipeline_step()
    def overwrite(data, ctx):
        ctx["scale"] = 3
        return data

    with pytest.raises(StepError, match="'overwrite'") as info:
        Pipeline([overwrite]).run(1, FrozenContext({"scale": 2}))
    assert isinstance(info.value.__cause__, ContextMutationError)


def test_steps_after_a_failure_do_not_run():
    ran = []

    @pipeline_step()
    def after(data):
        ran.append(data)
        return data

    with pytest.raises(StepError):
        Pipeline([explode, after]).run(1)
    assert ran == []


# -- metrics --------------------------------------------------------------------------


def test_metrics_from_ctx_and_from_a_mapping_return():
    ctx = FrozenContext()
    out = Pipeline([record_metrics, with_metrics_return, double]).run([1, 2, 3], ctx)
    assert out == [1, 2, 3, 1, 2, 3]  # the metrics mapping is split off the data
    assert ctx.metrics["seen"] == ([1, 2, 3],)
    assert ctx.metrics["total"] == (6,)
    assert ctx.metrics["count"] == (3,)


def test_a_tuple_that_is_not_data_and_mapping_is_passed_on():
    @pipeline_step()
    def pair(data):
        return data, [1]

    ctx = FrozenContext()
    assert Pipeline([pair]).run(0, ctx) == (0, [1])
    assert len(ctx.metrics) == 0


def test_metrics_accumulate_over_steps_of_a_run():
    ctx = FrozenContext()
    Pipeline([record_metrics, add, record_metrics]).run(1, ctx)
    assert ctx.metrics["seen"] == (1, 2)


# -- provenance -----------------------------------------------------------------------


def test_provenance_records_each_step():
    ctx = FrozenContext({"scale": 3})
    Pipeline([add(amount=2), reads_and_adds, Negate()]).run(1, ctx, cache=False)
    records = ctx.provenance
    assert [type(r) for r in records] == [StepRecord] * 3
    assert [r.name for r in records] == ["add", "reads_and_adds", "Negate"]
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].params == {"amount": 2}
    assert records[1].reads == ("scale",)
    assert records[1].added == ("scaled",)
    assert records[2].params == {}
    for record in records:
        assert record.cache == "off"
        assert record.step_hash is None and record.input_hash is None
        assert record.seconds >= 0


def test_provenance_of_a_cacheable_step(tmp_path):
    @pipeline_step(cacheable=True)
    def cached_add(data, ctx, *, amount=1):
        ctx.get("note")
        return data + amount

    from crystallize import LocalCacheStore

    store = LocalCacheStore(tmp_path)
    first, second = FrozenContext(), FrozenContext()
    Pipeline([cached_add]).run(1, first, cache=store)
    Pipeline([cached_add]).run(1, second, cache=store)
    assert first.provenance[0].cache == "miss"
    assert second.provenance[0].cache == "hit"
    for record in (first.provenance[0], second.provenance[0]):
        assert record.cache in {"off", "hit", "miss", "skipped"}
        assert len(record.step_hash) == 32 and len(record.input_hash) == 32
        assert record.reads == ("note",)
        assert record.params == {"amount": 1}
    assert first.provenance[0].step_hash == second.provenance[0].step_hash


def test_provenance_grows_per_run_of_a_context():
    ctx = FrozenContext()
    Pipeline([add, double]).run(1, ctx)
    assert [r.name for r in ctx.provenance] == ["add", "double"]
