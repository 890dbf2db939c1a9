"""Steps: the @pipeline_step factory, parameter injection, class-based steps, pickling."""

from __future__ import annotations

import asyncio
import pickle
from functools import partial

import cloudpickle
import pytest

from crystallize import (
    CrystallizeError,
    FrozenContext,
    MissingParameterError,
    ParameterError,
    Pipeline,
    PipelineStep,
    UnknownParameterError,
    pipeline_step,
)


@pipeline_step(cacheable=False)
def scale(data, ctx, *, factor=1.0):
    return [x * factor for x in data]


@pipeline_step()
def offset_by(data, *, offset=1):
    return data + offset


@pipeline_step()
def no_ctx(data, times=2):
    return data * times


@pipeline_step()
def ctx_keyword_only(data, *, ctx, label="none"):
    return (data, ctx.get("tag"), label)


@pipeline_step()
def needs_threshold(data, *, threshold):
    return [x for x in data if x > threshold]


@pipeline_step()
async def async_double(data, ctx, *, times=2):
    await asyncio.sleep(0)
    return data * times


@pipeline_step
def bare_decorated(data):
    return data + 1


class AddOffset(PipelineStep):
    """A class-based step that counts how often it is built and called."""

    built = 0

    def __init__(self, offset):
        type(self).built += 1
        self.offset = offset
        self.calls = 0

    def __call__(self, data, ctx):
        self.calls += 1
        return data + self.offset

    @property
    def params(self):
        return {"offset": self.offset}


class ResourceStep(PipelineStep):
    """Loads a resource in setup() and releases it in teardown()."""

    def __init__(self):
        self.resource = None
        self.events = []

    def setup(self, ctx):
        self.events.append("setup")
        self.resource = {"weight": 3}

    def teardown(self, ctx):
        self.events.append("teardown")
        self.resource = None

    def __call__(self, data, ctx):
        self.events.append("call")
        return data * self.resource["weight"]


# -- the factory ----------------------------------------------------------------------


def test_factory_returns_a_pipeline_step():
    step = scale(factor=2.0)
    assert isinstance(step, PipelineStep)
    assert step.cacheable is False
    assert step.name == "scale"
    assert dict(step.params) == {"factor": 2.0}
    assert repr(step) == "scale(factor=2.0)"


def test_each_factory_call_builds_a_new_step():
    assert scale(factor=2.0) is not scale(factor=2.0)


def test_decorator_without_parentheses():
    assert isinstance(bare_decorated(), PipelineStep)
    assert Pipeline([bare_decorated]).run(1) == 2


def test_a_step_is_callable_directly():
    assert scale(factor=3)([1, 2], FrozenContext()) == [3, 6]


def test_instance_partial_and_bare_factory_are_all_accepted_by_pipeline():
    ctx_factor = FrozenContext({"factor": 10})
    as_instance = Pipeline([scale(factor=2)])
    as_partial = Pipeline([partial(scale, factor=2)])
    as_factory = Pipeline([scale])
    assert as_instance.run([1, 2]) == [2, 4]
    assert as_partial.run([1, 2]) == [2, 4]
    assert as_factory.run([1, 2]) == [1.0, 2.0]
    assert as_factory.run([1, 2], ctx_factor) == [10, 20]
    for pipeline in (as_instance, as_partial, as_factory):
        assert isinstance(pipeline.steps[0], PipelineStep)


def test_ctx_is_optional_in_the_signature():
    assert Pipeline([no_ctx]).run(3) == 6
    assert Pipeline([no_ctx(times=3)]).run(3) == 9


def test_ctx_may_be_keyword_only():
    ctx = FrozenContext({"tag": "t1"})
    assert Pipeline([ctx_keyword_only(label="x")]).run(1, ctx) == (1, "t1", "x")


def test_keyword_only_parameters_are_injected_from_ctx():
    assert Pipeline([offset_by]).run(10, FrozenContext({"offset": 5})) == 15


def test_async_function_steps_are_awaited():
    step = async_double(times=3)
    assert isinstance(step, PipelineStep)
    assert Pipeline([step]).is_async
    assert Pipeline([step]).run(2) == 6
    assert asyncio.run(Pipeline([step]).arun(2)) == 6


def test_a_function_without_a_data_parameter_is_rejected():
    with pytest.raises(TypeError, match="first positional parameter"):

        @pipeline_step()
        def no_data(*, factor=1):
            return factor


def test_positional_only_step_parameters_are_rejected():
    with pytest.raises(TypeError, match="'factor' is positional-only"):

        @pipeline_step()
        def positional(data, factor, /):
            return data


# -- parameter errors -----------------------------------------------------------------


def test_unknown_parameter_names_it_and_lists_the_valid_ones():
    with pytest.raises(UnknownParameterError, match=r"'scale'.*'factr'.*parameters are: factor") as info:
        scale(factr=2.0)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, ParameterError)
    assert isinstance(info.value, CrystallizeError)


def test_unknown_parameter_lists_every_valid_parameter():
    @pipeline_step()
    def two_params(data, *, alpha=1, beta=2):
        return data

    with pytest.raises(TypeError, match=r"'gamma'.*alpha, beta"):
        two_params(gamma=3)


def test_unknown_parameter_in_a_partial_fails_when_the_pipeline_is_built():
    with pytest.raises(UnknownParameterError, match="'nope'"):
        Pipeline([partial(scale, nope=1)])


def test_a_function_with_var_keyword_accepts_any_parameter():
    @pipeline_step()
    def flexible(data, **options):
        return sorted(options.items())

    assert Pipeline([flexible(a=1, b=2)]).run(None) == [("a", 1), ("b", 2)]


def test_missing_required_parameter_fails_at_run_time_naming_step_and_parameter():
    pipeline = Pipeline([needs_threshold])  # building is fine: ctx may supply it later
    with pytest.raises(MissingParameterError, match=r"'needs_threshold'.*'threshold'") as info:
        pipeline.run([1, 2, 3])
    assert isinstance(info.value, ParameterError)
    assert pipeline.run([1, 2, 3], FrozenContext({"threshold": 1})) == [2, 3]
    assert Pipeline([needs_threshold(threshold=2)]).run([1, 2, 3]) == [3]


# -- injection precedence -------------------------------------------------------------


def test_injection_precedence_explicit_over_ctx_over_default():
    assert Pipeline([offset_by]).run(10) == 11  # default
    assert Pipeline([offset_by]).run(10, FrozenContext({"offset": 5})) == 15  # ctx
    assert Pipeline([offset_by(offset=100)]).run(10, FrozenContext({"offset": 5})) == 110
    assert Pipeline([offset_by(offset=100)]).run(10) == 110


def test_resolved_parameters_are_recorded_in_provenance():
    ctx = FrozenContext({"offset": 5})
    assert Pipeline([offset_by, no_ctx, offset_by(offset=1)]).run(10, ctx) == 31
    assert [record.params for record in ctx.provenance] == [
        {"offset": 5},  # from ctx
        {"times": 2},  # the default
        {"offset": 1},  # explicit
    ]


def test_editing_an_injected_value_does_not_change_the_context():
    @pipeline_step()
    def grow(data, *, items):
        items.append(99)
        return len(items)

    ctx = FrozenContext({"items": [1, 2]})
    assert Pipeline([grow]).run(None, ctx) == 3
    assert ctx.get("items") == [1, 2]
    assert Pipeline([grow]).run(None, ctx) == 3


def test_the_same_step_runs_with_different_injected_values_per_context():
    pipeline = Pipeline([offset_by])
    results = [pipeline.run(0, FrozenContext({"offset": k})) for k in range(3)]
    assert results == [0, 1, 2]


# -- class-based steps ----------------------------------------------------------------


def test_class_based_step_instance_is_reused_never_rebuilt():
    AddOffset.built = 0
    step = AddOffset(5)
    pipeline = Pipeline([step])
    assert pipeline.steps[0] is step
    assert [pipeline.run(i) for i in range(3)] == [5, 6, 7]
    other = Pipeline([step, step])
    assert other.run(0) == 10
    assert step.calls == 5
    assert AddOffset.built == 1


def test_class_based_step_params_name_and_defaults():
    step = AddOffset(2)
    assert step.name == "AddOffset"
    assert dict(step.params) == {"offset": 2}
    assert step.cacheable is False
    assert repr(step) == "AddOffset(offset=2)"


def test_class_based_step_setup_and_teardown():
    step = ResourceStep()
    ctx = FrozenContext()
    step.setup(ctx)
    pipeline = Pipeline([step])
    assert pipeline.run(2) == 6
    assert pipeline.run(3) == 9
    step.teardown(ctx)
    assert step.events == ["setup", "call", "call", "teardown"]
    assert step.resource is None


def test_default_setup_and_teardown_do_nothing():
    step = AddOffset(1)
    assert step.setup(FrozenContext()) is None
    assert step.teardown(FrozenContext()) is None


def test_class_step_without_call_says_what_to_define():
    class Empty(PipelineStep):
        pass

    with pytest.raises(CrystallizeError, match=r"Empty.*__call__") as info:
        Pipeline([Empty()]).run(1)
    assert isinstance(info.value.__cause__, NotImplementedError)


# -- pickling -------------------------------------------------------------------------

PICKLERS = pytest.mark.parametrize(
    "dumps, loads",
    [(pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)],
    ids=["pickle", "cloudpickle"],
)


@PICKLERS
def test_function_steps_survive_pickling(dumps, loads):
    step = scale(factor=3)
    clone = loads(dumps(step))
    assert isinstance(clone, PipelineStep)
    assert dict(clone.params) == {"factor": 3}
    assert Pipeline([clone]).run([1, 2]) == [3, 6]
    assert Pipeline([loads(dumps(scale()))]).run([1], FrozenContext({"factor": 4})) == [4]


@PICKLERS
def test_async_function_steps_survive_pickling(dumps, loads):
    clone = loads(dumps(async_double(times=4)))
    assert Pipeline([clone]).run(2) == 8


@PICKLERS
def test_class_steps_survive_pickling(dumps, loads):
    step = AddOffset(7)
    Pipeline([step]).run(0)
    clone = loads(dumps(step))
    assert clone is not step
    assert clone.offset == 7 and clone.calls == 1
    assert Pipeline([clone]).run(1) == 8
    assert clone.calls == 2 and step.calls == 1


def test_locally_defined_steps_survive_cloudpickle():
    @pipeline_step()
    def local_power(data, *, exponent=2):
        return data**exponent

    class LocalStep(PipelineStep):
        def __call__(self, data, ctx):
            return -data

    pipeline = cloudpickle.loads(cloudpickle.dumps(Pipeline([local_power(exponent=3), LocalStep()])))
    assert pipeline.run(2) == -8


def test_a_step_editing_its_explicit_list_parameter_does_not_change_later_runs():
    from crystallize import Pipeline

    @pipeline_step()
    def extend(data, *, items):
        items.append(data)
        return list(items)

    pipeline = Pipeline([extend(items=[0])])
    assert pipeline.run(1) == [0, 1]
    assert pipeline.run(2) == [0, 2]
