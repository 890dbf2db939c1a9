"""Treatments (mapping, callable, helper, decorator; overriding initial_ctx; write-once
keys inside a run) and hypotheses (verifiers, rankers, ranking, failures, pickling)."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

from crystallize import (
    ContextMutationError,
    Experiment,
    FrozenContext,
    Hypothesis,
    HypothesisResult,
    ParallelExecution,
    Pipeline,
    Treatment,
    Verifier,
    hypothesis,
    pipeline_step,
    treatment,
    verifier,
)


@pipeline_step()
def scaled(data, ctx, *, factor: int = 1):
    ctx.metrics.add("score", sum(data) * factor)
    return data


@pipeline_step()
def record_keys(data, ctx):
    ctx.metrics.add("lr", ctx.get("lr", "absent"))
    ctx.metrics.add("warmup", ctx.get("warmup_steps", "absent"))
    return data


@pipeline_step()
def overwrite_factor(data, ctx):
    ctx.add("factor", 99)
    return data


@pipeline_step()
def shift(data, ctx, *, delta: float = 0.0):
    ctx.metrics.add("score", 10.0 + ctx["replicate"] + delta)
    return data


def _run(treatments, *, steps=None, initial_ctx=None, replicates=2, **kw):
    exp = Experiment(
        lambda ctx: [1, 2],
        Pipeline(steps or [scaled()]),
        treatments=treatments,
        initial_ctx=initial_ctx,
        replicates=replicates,
        **kw,
    )
    return exp.run()


# ----------------------------------------------------------------------- treatments


def test_mapping_callable_helper_and_decorator_treatments():
    def add_lr(ctx):
        ctx.add("lr", 0.5)

    @treatment("warm")
    def warm(ctx):
        ctx.add("warmup_steps", 100)

    assert isinstance(warm, Treatment) and warm.name == "warm"
    helper = treatment("high_lr", {"lr": 0.1})
    assert isinstance(helper, Treatment)
    result = _run(
        [Treatment("mapped", {"lr": 0.01}), Treatment("called", add_lr), helper, warm],
        steps=[record_keys()],
    )
    t = result.metrics.treatments
    assert result.errors == []
    assert list(t) == ["mapped", "called", "high_lr", "warm"]
    assert result.metrics.baseline.metrics == {"lr": ["absent", "absent"], "warmup": ["absent", "absent"]}
    assert t["mapped"].metrics["lr"] == [0.01, 0.01]
    assert t["called"].metrics["lr"] == [0.5, 0.5]
    assert t["high_lr"].metrics["lr"] == [0.1, 0.1]
    assert t["warm"].metrics == {"lr": ["absent", "absent"], "warmup": [100, 100]}


def _set_factor(ctx):
    ctx.add("factor", 3)


@pytest.mark.parametrize("apply", [{"factor": 3}, _set_factor], ids=["mapping", "callable"])
def test_treatment_overrides_initial_ctx_key(apply):
    result = _run([Treatment("x", apply)], initial_ctx={"factor": 1})
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"score": [3, 3]}
    assert result.metrics.treatments["x"].metrics == {"score": [9, 9]}


def test_treatment_override_does_not_leak_into_other_conditions():
    result = _run(
        [Treatment("x", {"factor": 3}), Treatment("y", {"other": 1})],
        initial_ctx={"factor": 2},
        plugins=[ParallelExecution(max_workers=2)],
    )
    assert result.metrics.baseline.metrics == {"score": [6, 6]}
    assert result.metrics.treatments["x"].metrics == {"score": [9, 9]}
    assert result.metrics.treatments["y"].metrics == {"score": [6, 6]}


def test_keys_stay_write_once_inside_a_run():
    result = _run([Treatment("x", {"factor": 3})], steps=[overwrite_factor(), scaled()], initial_ctx={"factor": 1})
    assert len(result.errors) == 4  # every run of every condition
    for err in result.errors:
        assert err.type == "ContextMutationError"
        assert err.step == "overwrite_factor"
        assert "'factor' is already set" in err.message
    assert result.metrics.baseline.metrics == {}


def test_callable_treatment_cannot_set_an_overridable_key_twice():
    def twice(ctx):
        ctx.add("factor", 2)
        ctx.add("factor", 3)

    result = _run([Treatment("twice", twice)], initial_ctx={"factor": 1})
    assert result.metrics.baseline.metrics == {"score": [3, 3]}
    assert [(e.condition, e.step, e.type) for e in result.errors] == [
        ("twice", "treatment", "ContextMutationError")
    ] * 2


def test_treatment_cannot_set_reserved_keys():
    exp = Experiment(lambda ctx: [1], Pipeline([scaled()]), treatments=[Treatment("r", {"replicate": 7})])
    with pytest.raises(Exception, match=r"sets reserved key\(s\) \['replicate'\]"):
        exp.validate()


def test_treatment_constructor_rejects_bad_arguments():
    with pytest.raises(TypeError, match="non-empty string"):
        Treatment("", {"a": 1})
    with pytest.raises(TypeError, match="needs a mapping of context values or a callable"):
        Treatment("x", 5)


def test_treatment_mapping_is_a_snapshot():
    values = {"lr": 0.1}
    t = Treatment("t", values)
    values["lr"] = 0.9
    ctx = FrozenContext()
    t.apply(ctx)
    assert ctx["lr"] == 0.1
    with pytest.raises(TypeError):
        t.mapping["lr"] = 1.0  # type: ignore[index]


def test_treatment_on_plain_context_refuses_existing_key():
    ctx = FrozenContext({"lr": 0.2})
    with pytest.raises(ContextMutationError, match="'lr' is already set"):
        Treatment("t", {"lr": 0.1}).apply(ctx)


# ----------------------------------------------------------------------- verifiers


@verifier
def mean_gain(baseline, treatment, *, metric="score", margin=0.0):
    b = sum(baseline[metric]) / len(baseline[metric])
    t = sum(treatment[metric]) / len(treatment[metric])
    return {"gain": t - b, "accepted": t - b > margin}


@verifier
def picky(baseline, treatment):
    gain = sum(treatment["score"]) - sum(baseline["score"])
    if gain < 0:
        raise ZeroDivisionError("picky refuses losses")
    return {"gain": gain}


def test_verifier_is_parameterised():
    loose, strict = mean_gain(margin=0.5), mean_gain(margin=5.0)
    assert isinstance(loose, Verifier)
    assert loose.params == {"margin": 0.5}
    assert loose({"score": [1, 1]}, {"score": [2, 2]}) == {"gain": 1.0, "accepted": True}
    assert strict({"score": [1, 1]}, {"score": [2, 2]}) == {"gain": 1.0, "accepted": False}


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_verifier_round_trips_through_pickle(dumps):
    original = mean_gain(margin=2.0, metric="x")
    restored = pickle.loads(dumps(original))
    assert isinstance(restored, Verifier)
    assert restored.params == {"margin": 2.0, "metric": "x"}
    assert restored({"x": [1]}, {"x": [4]}) == {"gain": 3.0, "accepted": True}
    assert restored({"x": [1]}, {"x": [2]}) == {"gain": 1.0, "accepted": False}


def test_verifier_must_return_a_mapping():
    @verifier
    def bad(baseline, treatment):
        return 0.5

    with pytest.raises(TypeError, match="Verifier 'bad' must return a mapping"):
        bad()({"s": [1]}, {"s": [2]})


# ----------------------------------------------------------------------- hypotheses


def _gain_experiment(hypotheses):
    return Experiment(
        lambda ctx: None,
        Pipeline([shift()]),
        treatments=[
            Treatment("small", {"delta": 1.0}),
            Treatment("big", {"delta": 5.0}),
            Treatment("worse", {"delta": -2.0}),
        ],
        hypotheses=hypotheses,
        replicates=3,
    )


def test_hypothesis_decorator_ranks_best_first():
    @hypothesis(verifier=mean_gain(), metrics="score", name="gain_rank")
    def by_gain(result):
        return -result["gain"]

    assert isinstance(by_gain, Hypothesis)
    result = _gain_experiment([by_gain]).run()
    h = result.get_hypothesis("gain_rank")
    assert isinstance(h, HypothesisResult)
    assert h.metrics == ["score"]
    assert h.ranking == ["big", "small", "worse"]
    assert h.best == "big"
    assert h.results["big"] == {"gain": 5.0, "accepted": True}
    assert h.get_for_treatment("worse") == {"gain": -2.0, "accepted": False}
    assert h.scores == {"small": -1.0, "big": -5.0, "worse": 2.0}
    assert h.errors == {}
    assert result.get_hypothesis("nope") is None


def test_hypothesis_name_defaults_to_ranker_name():
    @hypothesis(verifier=mean_gain(), metrics=["score"])
    def prefer_gain(result):
        return -result["gain"]

    assert prefer_gain.name == "prefer_gain"
    result = _gain_experiment([prefer_gain]).run()
    assert result.get_hypothesis("prefer_gain").ranking == ["big", "small", "worse"]


def test_several_hypotheses_are_evaluated_separately():
    up = hypothesis(verifier=mean_gain(), metrics="score", name="up")(lambda r: -r["gain"])
    down = hypothesis(verifier=mean_gain(), metrics="score", name="down")(lambda r: r["gain"])
    result = _gain_experiment([up, down]).run()
    assert result.get_hypothesis("up").ranking == ["big", "small", "worse"]
    assert result.get_hypothesis("down").ranking == ["worse", "small", "big"]
    assert [h.name for h in result.metrics.hypotheses] == ["up", "down"]


def test_raising_verifier_is_recorded_and_metrics_survive():
    @hypothesis(verifier=picky(), metrics="score", name="picky")
    def rank(result):
        return -result["gain"]

    result = _gain_experiment([rank]).run()
    h = result.get_hypothesis("picky")
    assert set(h.results) == {"small", "big"}
    assert h.ranking == ["big", "small"]
    assert list(h.errors) == ["worse"]
    assert "ZeroDivisionError: picky refuses losses" in h.errors["worse"]
    assert result.errors == []
    assert result.metrics.treatments["worse"].metrics == {"score": [8.0, 9.0, 10.0]}
    assert result.metrics.baseline.metrics == {"score": [10.0, 11.0, 12.0]}
    assert "worse: ERROR" in str(result)


def test_hypothesis_missing_metric_is_an_error_not_a_crash():
    h = hypothesis(verifier=mean_gain(metric="nope"), metrics="nope", name="missing")(lambda r: 0.0)
    result = _gain_experiment([h]).run()
    errors = result.get_hypothesis("missing").errors
    assert set(errors) == {"small", "big", "worse"}
    assert "no values for metric(s) ['nope']" in errors["big"]


def test_duplicate_hypothesis_names_rejected():
    h1 = hypothesis(verifier=mean_gain(), metrics="score", name="same")(lambda r: 0.0)
    h2 = hypothesis(verifier=mean_gain(), metrics="score", name="same")(lambda r: 1.0)
    with pytest.raises(Exception, match="two hypotheses are named 'same'"):
        _gain_experiment([h1, h2]).validate()


def test_hypothesis_with_plain_callable_and_default_ranker():
    def p_value(baseline, treatment):
        return {"p_value": 1.0 / (1.0 + abs(sum(treatment["score"]) - sum(baseline["score"])))}

    result = _gain_experiment([Hypothesis(p_value, "score", name="p")]).run()
    # default ranker: lowest p_value first
    assert result.get_hypothesis("p").ranking == ["big", "worse", "small"]


def test_a_lambda_ranker_does_not_name_the_hypothesis_lambda():
    from crystallize import Hypothesis

    named = Hypothesis(verifier=lambda b, t: {"p_value": 0.1}, metrics="x", ranker=lambda r: 0.0)
    assert named.name != "<lambda>"
