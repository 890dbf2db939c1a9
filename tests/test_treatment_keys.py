"""Treatment keys that nothing reads: warned before the runs, reported after them."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import pytest

from crystallize import (
    Experiment,
    ParallelExecution,
    PipelineStep,
    Treatment,
    data_source,
    pipeline_step,
)
from crystallize.errors import UnusedTreatmentKeyWarning


@pipeline_step()
def fit(data, *, C=1.0):
    return data, {"C": C}


@pipeline_step()
def reads_lr(data, ctx):
    return data, {"lr": ctx.get("lr", 0.01)}


@pipeline_step()
def lists_everything(data, ctx):
    return data, {"keys": len(list(ctx))}  # lists the keys, reads no value


@pipeline_step()
def fails_when_treated(data, ctx):
    if ctx["condition"] != "baseline":
        raise RuntimeError("this condition never finishes")
    return data


@data_source
def numbers(ctx, *, n=2):
    return list(range(n))


class ReadsByName(PipelineStep):
    """Reads a context key whose name it was given, so no code of it spells the key."""

    def __init__(self, key):
        self.key = key

    def __call__(self, data, ctx):
        return data, {"read": ctx.get(self.key, None)}


@contextmanager
def no_unused_key_warning():
    """A block in which an UnusedTreatmentKeyWarning is raised, failing the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedTreatmentKeyWarning)
        yield


# ------------------------------------------------------------ before the runs


def test_a_misspelt_key_warns_with_a_did_you_mean_and_changes_nothing():
    exp = Experiment(lambda ctx: 0, [fit()], treatments=[Treatment("C=10", {"c": 10.0})], replicates=2)
    with pytest.warns(
        UnusedTreatmentKeyWarning,
        match=r"Treatment 'C=10' sets 'c', but no step or data-source parameter and no "
        r"initial_ctx key is named 'c' \(did you mean 'C'\?\)",
    ) as caught:
        result = exp.run()
    assert caught[0].filename == __file__  # points at the user's run() call
    assert result.metrics.treatments["C=10"].metrics["C"] == [1.0, 1.0]  # the default ran
    assert result.provenance["unused_treatment_keys"] == {"C=10": ["c"]}


def test_validate_warns_instead_of_raising():
    exp = Experiment(
        lambda ctx: 0,
        [fit()],
        treatments=[Treatment("t", {"learning_rat": 0.1}), Treatment("u", {"C": 3.0})],
        initial_ctx={"learning_rate": 0.01},
    )
    with pytest.warns(UnusedTreatmentKeyWarning, match=r"'learning_rat'.*did you mean 'learning_rate'") as caught:
        exp.validate()
    assert len(caught) == 1
    assert caught[0].filename == __file__


def test_an_explicit_parameter_wins_over_the_treatment_and_is_named():
    exp = Experiment(lambda ctx: 0, [fit(C=1.0)], treatments=[Treatment("t", {"C": 10.0})])
    with pytest.warns(UnusedTreatmentKeyWarning, match=r"step 'fit' was given 'C' explicitly"):
        result = exp.run()
    assert result.metrics.treatments["t"].metrics["C"] == [1.0]
    assert result.provenance["unused_treatment_keys"] == {"t": ["C"]}


def test_keys_that_something_takes_or_reads_do_not_warn():
    exp = Experiment(
        numbers(), [fit(), reads_lr()], treatments=[Treatment("t", {"C": 3.0, "lr": 0.5, "n": 4})], replicates=2
    )
    with no_unused_key_warning():
        result = exp.run()
        exp.validate()
    assert result.metrics.treatments["t"].metrics == {"C": [3.0, 3.0], "lr": [0.5, 0.5]}
    assert result.provenance["unused_treatment_keys"] == {}


def test_callable_treatments_are_not_checked():
    exp = Experiment(lambda ctx: 0, [fit()], treatments=[Treatment("t", lambda ctx: ctx.add("zzz", 1))])
    with no_unused_key_warning():
        result = exp.run()
    assert result.provenance["unused_treatment_keys"] == {}


# ------------------------------------------------------------- after the runs


def test_a_key_read_by_a_computed_name_warns_but_is_not_reported_after_the_run():
    key = "gain"
    exp = Experiment(lambda ctx: 0, [ReadsByName(key)], treatments=[Treatment("t", {key: 2})])
    with pytest.warns(UnusedTreatmentKeyWarning, match=r"Unless one reads it by a computed name"):
        result = exp.run()
    assert result.metrics.treatments["t"].metrics["read"] == [2]
    assert result.provenance["unused_treatment_keys"] == {}


def test_an_initial_ctx_key_no_run_reads_is_reported_once_after_the_run(caplog):
    exp = Experiment(
        lambda ctx: 0,
        [fit()],
        name="sweep",
        initial_ctx={"lr": 0.1},
        treatments=[Treatment("fast", {"lr": 0.5, "C": 2.0}), Treatment("slow", {"lr": 0.01})],
    )
    # initial_ctx names it, so there is nothing to say before the runs
    with no_unused_key_warning(), caplog.at_level(logging.WARNING, logger="crystallize.experiment"):
        result = exp.run(replicates=3)
    assert result.provenance["unused_treatment_keys"] == {"fast": ["lr"], "slow": ["lr"]}
    [record] = [r for r in caplog.records if "treatment keys" in r.getMessage()]
    assert "'fast': 'lr'; 'slow': 'lr'" in record.getMessage()
    assert "result.provenance['unused_treatment_keys']" in record.getMessage()


def test_a_step_that_lists_every_key_counts_as_reading_them():
    exp = Experiment(
        lambda ctx: 0, [lists_everything()], initial_ctx={"lr": 0.1}, treatments=[Treatment("t", {"lr": 0.5})]
    )
    assert exp.run().provenance["unused_treatment_keys"] == {}


def test_a_condition_whose_runs_all_failed_is_not_judged():
    exp = Experiment(
        lambda ctx: 0,
        [fails_when_treated(), fit()],
        initial_ctx={"lr": 0.1},
        treatments=[Treatment("t", {"lr": 0.5})],
        replicates=2,
    )
    result = exp.run()
    assert len(result.errors) == 2
    assert result.provenance["unused_treatment_keys"] == {}


def test_reads_recorded_in_worker_processes_are_judged_in_the_driver():
    exp = Experiment(
        lambda ctx: 0,
        [fit(), reads_lr()],
        initial_ctx={"lr": 0.1, "momentum": 0.9},
        treatments=[Treatment("t", {"lr": 0.5, "momentum": 0.5})],
        replicates=4,
        plugins=[ParallelExecution(max_workers=2, executor_type="process")],
    )
    result = exp.run()
    assert result.errors == []
    assert result.metrics.treatments["t"].metrics["lr"] == [0.5] * 4
    assert result.provenance["unused_treatment_keys"] == {"t": ["momentum"]}
