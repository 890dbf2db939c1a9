"""Experiment: datasources, validation, overrides, reuse, arun, setup/teardown, the
Result grid and the plugin hooks, all through the public API."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from crystallize import (
    AsyncExecution,
    BasePlugin,
    DataSource,
    Experiment,
    LoggingPlugin,
    ParallelExecution,
    Pipeline,
    PipelineError,
    PipelineStep,
    Result,
    RunError,
    RunResult,
    SeedPlugin,
    SerialExecution,
    Treatment,
    ValidationError,
    data_source,
    hypothesis,
    pipeline_step,
    verifier,
)

# --------------------------------------------------------------------------- steps


@pipeline_step()
def record_total(data, ctx):
    ctx.metrics.add("total", sum(data))
    return data


@pipeline_step()
def record_replicate(data, ctx, *, offset: int = 0):
    ctx.metrics.add("value", ctx["replicate"] * 10 + offset)
    return data


@pipeline_step()
def fail_on(data, ctx, *, bad_replicate: int = 1):
    if ctx["replicate"] == bad_replicate:
        raise ValueError(f"boom at replicate {bad_replicate}")  # RAISING-LINE
    return data


@pipeline_step()
async def async_total(data, ctx):
    await asyncio.sleep(0)
    ctx.metrics.add("total", sum(data))
    return data


class Numbers(DataSource):
    def __init__(self, values):
        self.values = list(values)

    def fetch(self, ctx):
        return list(self.values)


@data_source
def numbers(ctx, n=3):
    return list(range(1, n + 1))


@data_source
def needs_size(ctx, size):
    return [1] * size


def plain_source(ctx):
    return [4, 5]


class CountingStep(PipelineStep):
    """A class step counting its setup/teardown/call invocations."""

    def __init__(self):
        self.setups = 0
        self.teardowns = 0
        self.calls = 0

    def setup(self, ctx):
        self.setups += 1

    def teardown(self, ctx):
        self.teardowns += 1

    def __call__(self, data, ctx):
        self.calls += 1
        ctx.metrics.add("ready", self.setups - self.teardowns)
        return data


def _only_match(problems: list[str], pattern: str) -> str:
    hits = [p for p in problems if re.search(pattern, p)]
    assert len(hits) == 1, f"{pattern!r} matched {hits} in {problems}"
    return hits[0]


# ---------------------------------------------------------------------- datasources


@pytest.mark.parametrize(
    "source, expected",
    [
        (lambda ctx: [1, 2, 3], 6),
        (plain_source, 9),
        (Numbers([10, 20]), 30),
        (numbers, 6),  # a bare @data_source factory
        (numbers(n=4), 10),  # a @data_source factory called with params
    ],
    ids=["lambda", "function", "DataSource-subclass", "data_source-bare", "data_source-called"],
)
def test_datasource_forms(source, expected):
    result = Experiment(source, Pipeline([record_total()]), replicates=2).run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"total": [expected, expected]}


def test_data_source_params_injected_from_ctx_and_explicit_wins():
    from_ctx = Experiment(numbers, Pipeline([record_total()]), initial_ctx={"n": 5}).run()
    assert from_ctx.metrics.baseline.metrics == {"total": [15]}
    explicit = Experiment(numbers(n=2), Pipeline([record_total()]), initial_ctx={"n": 5}).run()
    assert explicit.metrics.baseline.metrics == {"total": [3]}
    treated = Experiment(numbers, Pipeline([record_total()]), treatments=[Treatment("big", {"n": 10})]).run()
    assert treated.metrics.baseline.metrics == {"total": [6]}
    assert treated.metrics.treatments["big"].metrics == {"total": [55]}


def test_data_source_missing_param_is_a_run_error_at_datasource():
    result = Experiment(needs_size, Pipeline([record_total()]), replicates=2).run()
    assert len(result.errors) == 2
    err = result.errors[0]
    assert (err.step, err.type) == ("datasource", "MissingParameterError")
    assert "size" in err.message
    ok = Experiment(needs_size, Pipeline([record_total()]), initial_ctx={"size": 4}).run()
    assert ok.metrics.baseline.metrics == {"total": [4]}


def test_async_datasource_and_async_step_under_serial():
    async def source(ctx):
        await asyncio.sleep(0)
        return [2, 2]

    result = Experiment(source, Pipeline([async_total()]), replicates=2).run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"total": [4, 4]}


# ------------------------------------------------------------------------ validate


class MisspeltHook(BasePlugin):
    def before_replicat(self, experiment, ctx):  # the typo under test
        pass


class WrongSignature(BasePlugin):
    def after_run(self, result):  # missing the experiment argument
        pass


def test_validate_reports_every_problem_at_once():
    exp = Experiment(
        datasource=42,
        pipeline=Pipeline([record_total()]),
        plugins=[SerialExecution(), ParallelExecution(max_workers=2), MisspeltHook(), WrongSignature()],
        treatments=[Treatment("a", {"x": 1}), Treatment("a", {"x": 2}), Treatment("baseline", {"x": 3})],
        replicates=0,
    )
    with pytest.raises(ValidationError, match=r"7 problem\(s\)") as info:
        exp.validate()
    problems = info.value.problems
    assert len(problems) == 7
    _only_match(problems, r"datasource must be a callable")
    _only_match(problems, r"2 execution backends \(SerialExecution, ParallelExecution\)")
    _only_match(problems, r"replicates must be a positive integer, got 0")
    _only_match(problems, r"two treatments are named 'a'")
    _only_match(problems, r"cannot be named 'baseline'")
    _only_match(problems, r"MisspeltHook defines before_replicat\(\), which is not a hook")
    _only_match(problems, r"WrongSignature\.after_run must accept \(experiment, result\)")
    # run() refuses the same experiment before anything runs
    with pytest.raises(ValidationError, match=r"7 problem\(s\)"):
        exp.run()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_replicates_rejected(bad):
    exp = Experiment(lambda ctx: [1], Pipeline([record_total()]))
    with pytest.raises(ValidationError, match="replicates must be a positive integer"):
        exp.run(replicates=bad)


def test_validate_passes_for_a_sound_experiment():
    exp = Experiment(
        lambda ctx: [1],
        Pipeline([record_total()]),
        plugins=[ParallelExecution(max_workers=2), SeedPlugin(seed=1), LoggingPlugin()],
        treatments=[Treatment("a", {"x": 1})],
        replicates=2,
    )
    assert exp.validate() is None


def test_hypotheses_without_treatments_rejected():
    @verifier
    def always(baseline, treatment):
        return {"ok": True}

    exp = Experiment(
        lambda ctx: [1],
        Pipeline([record_total()]),
        hypotheses=[hypothesis(verifier=always(), metrics="total")(lambda r: 0.0)],
    )
    with pytest.raises(ValidationError, match="no treatments"):
        exp.run()


# ----------------------------------------------------------------------- overrides


def test_run_overrides_replicates_treatments_and_hypotheses():
    @verifier
    def difference(baseline, treatment):
        return {"delta": treatment["value"][0] - baseline["value"][0]}

    exp = Experiment(
        lambda ctx: [1],
        Pipeline([record_replicate()]),
        treatments=[Treatment("plus1", {"offset": 1})],
        replicates=2,
    )
    default = exp.run()
    assert default.metrics.baseline.metrics == {"value": [0, 10]}
    assert list(default.metrics.treatments) == ["plus1"]
    assert default.metrics.hypotheses == []

    hyp = hypothesis(verifier=difference(), metrics="value", name="diff")(lambda r: -r["delta"])
    override = exp.run(replicates=3, treatments=[Treatment("plus5", {"offset": 5})], hypotheses=[hyp])
    assert override.metrics.baseline.metrics == {"value": [0, 10, 20]}
    assert override.metrics.treatments["plus5"].metrics == {"value": [5, 15, 25]}
    assert list(override.metrics.treatments) == ["plus5"]
    assert override.get_hypothesis("diff").results == {"plus5": {"delta": 5}}
    assert override.provenance["replicates"] == 3
    # the experiment's own configuration is untouched
    assert exp.replicates == 2
    assert [t.name for t in exp.treatments] == ["plus1"]
    assert exp.hypotheses == []


def test_same_experiment_run_twice_is_equal_and_stateless():
    step = CountingStep()
    exp = Experiment(
        lambda ctx: [1, 2],
        Pipeline([record_replicate(), step]),
        plugins=[SeedPlugin(seed=11)],
        treatments=[Treatment("t", {"offset": 3})],
        replicates=3,
    )
    first, second = exp.run(), exp.run()
    assert first.metrics.baseline.metrics == second.metrics.baseline.metrics
    assert first.metrics.treatments["t"].metrics == second.metrics.treatments["t"].metrics
    assert [(r.replicate, r.condition, r.seed, r.metrics) for r in first.runs] == [
        (r.replicate, r.condition, r.seed, r.metrics) for r in second.runs
    ]
    assert len(second.runs) == 6 and second.errors == []
    assert len(exp.plugins) == 1 and len(exp.treatments) == 1 and exp.replicates == 3
    assert step.calls == 12


# ----------------------------------------------------------------------- arun


def test_arun_inside_asyncio_run():
    exp = Experiment(
        lambda ctx: [1, 2], Pipeline([async_total(), record_replicate()]), plugins=[AsyncExecution()], replicates=3
    )

    async def main():
        return await exp.arun()

    result = asyncio.run(main())
    assert isinstance(result, Result)
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"total": [3, 3, 3], "value": [0, 10, 20]}


def test_arun_with_a_sync_backend_inside_asyncio_run():
    exp = Experiment(lambda ctx: [1, 2], Pipeline([async_total()]), replicates=2)
    result = asyncio.run(exp.arun(replicates=4))
    assert result.metrics.baseline.metrics == {"total": [3, 3, 3, 3]}


def test_sync_run_inside_event_loop_with_async_backend_points_to_arun():
    exp = Experiment(lambda ctx: [1], Pipeline([async_total()]), plugins=[AsyncExecution()])

    async def main():
        return exp.run()

    with pytest.raises(PipelineError, match=r"await experiment\.arun"):
        asyncio.run(main())


# ------------------------------------------------------------- setup / teardown


@pytest.mark.parametrize(
    "backend",
    [
        lambda: SerialExecution(),
        lambda: ParallelExecution(max_workers=2, executor_type="thread"),
        lambda: AsyncExecution(),
    ],
    ids=["serial", "thread", "async"],
)
def test_class_step_setup_and_teardown_once_per_run(backend):
    step = CountingStep()
    exp = Experiment(
        lambda ctx: [1], Pipeline([step]), plugins=[backend()], treatments=[Treatment("t", {"k": 1})], replicates=4
    )
    result = exp.run()
    assert (step.setups, step.teardowns, step.calls) == (1, 1, 8)
    # every run saw the step set up and not yet torn down
    assert result.metrics.baseline.metrics == {"ready": [1, 1, 1, 1]}
    exp.run()
    assert (step.setups, step.teardowns, step.calls) == (2, 2, 16)


def test_class_step_setup_and_teardown_once_under_arun():
    step = CountingStep()
    exp = Experiment(lambda ctx: [1], Pipeline([step]), plugins=[AsyncExecution()], replicates=5)
    asyncio.run(exp.arun())
    assert (step.setups, step.teardowns, step.calls) == (1, 1, 5)


# ------------------------------------------------------------------- the Result


def _grid_experiment(**kwargs):
    return Experiment(
        lambda ctx: [1, 2, 3],
        Pipeline([record_replicate(), fail_on(bad_replicate=1)]),
        plugins=[SeedPlugin(seed=5)],
        treatments=[Treatment("treat", {"offset": 1})],
        replicates=3,
        name="grid",
        **kwargs,
    )


def test_result_grid_metrics_runs_and_pairing():
    result = _grid_experiment().run()
    # flat lists hold the successful runs' values, in replicate order
    assert result.metrics.baseline.metrics == {"value": [0, 20]}
    assert result.metrics.treatments["treat"].metrics == {"value": [1, 21]}
    assert len(result.runs) == 6
    assert all(isinstance(r, RunResult) for r in result.runs)
    assert {(r.replicate, r.condition) for r in result.runs} == {
        (r, c) for r in range(3) for c in ("baseline", "treat")
    }
    for i in range(3):
        base, treat = result.run(i, "baseline"), result.run(i, "treat")
        assert (base.replicate, treat.replicate) == (i, i)
        assert base.seed is not None and base.seed == treat.seed
        # every run's record keeps its metrics, even the failed ones
        assert base.metrics == {"value": [i * 10]}
        assert treat.metrics == {"value": [i * 10 + 1]}
    assert result.run(0).condition == "baseline"
    assert len({result.run(i).seed for i in range(3)}) == 3
    with pytest.raises(KeyError, match="No run for replicate 9"):
        result.run(9, "treat")


def test_result_errors_name_replicate_condition_step_and_traceback():
    result = _grid_experiment().run()
    assert len(result.errors) == 2
    assert {(e.replicate, e.condition) for e in result.errors} == {(1, "baseline"), (1, "treat")}
    for err in result.errors:
        assert isinstance(err, RunError)
        assert err.step == "fail_on"
        assert err.type == "ValueError"
        assert err.message == "boom at replicate 1"
        assert "RAISING-LINE" in err.traceback
        assert "Traceback" in err.traceback
    assert result.run(1, "treat").error is not None and not result.run(1, "treat").ok
    assert result.run(0, "treat").ok


def test_result_to_dataframe():
    pandas = pytest.importorskip("pandas")
    df = _grid_experiment().run().to_dataframe()
    assert isinstance(df, pandas.DataFrame)
    # the treatment's parameter (offset) is a column: baseline rows hold None (no initial_ctx value)
    assert list(df.columns) == ["replicate", "condition", "seed", "metric", "index", "value", "error", "offset"]
    assert sorted(set(df[df["condition"] == "treat"]["offset"])) == [1]
    assert df[df["condition"] == "baseline"]["offset"].isna().all()
    assert len(df) == 6
    ok = df[df["error"].isna()]
    assert sorted(ok[ok["condition"] == "treat"]["value"]) == [1, 21]
    failed = df[df["error"].notna()]
    assert sorted(failed["replicate"]) == [1, 1]
    assert all("boom at replicate 1" in e for e in failed["error"])


def test_result_summary_table():
    result = _grid_experiment().run()
    text = str(result)
    assert text == result.summary()
    assert "Experiment grid: 6 runs, 2 failed" in text
    assert re.search(r"^condition\s+metric\s+n\s+mean", text, re.M)
    assert re.search(r"^baseline\s+value\s+2\s+10\b", text, re.M)
    assert re.search(r"^treat\s+value\s+2\s+11\b", text, re.M)
    failed = [line for line in text.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2
    assert all("fail_on" in line and "ValueError: boom at replicate 1" in line for line in failed)


def test_print_result(capsys):
    print(_grid_experiment().run())
    out = capsys.readouterr().out
    assert "baseline" in out and "treat" in out and "value" in out and "FAILED" in out


def test_result_provenance():
    result = _grid_experiment().run()
    prov = result.provenance
    assert prov["name"] == "grid"
    assert prov["replicates"] == 3
    assert prov["conditions"] == ["baseline", "treat"]
    assert prov["backend"] == "SerialExecution"
    assert prov["seed"] == 5
    assert prov["complete"] is True


# ------------------------------------------------------------------------ plugins


class Recorder(BasePlugin):
    """Records the hooks it sees; the replicate hooks also leave marks in ctx."""

    def __init__(self):
        self.events = []

    def before_run(self, experiment):
        self.events.append(("before_run", experiment.name))

    def before_replicate(self, experiment, ctx):
        self.events.append(("before_replicate", ctx["replicate"], ctx["condition"]))
        ctx.add("stamp", f"{ctx['condition']}-{ctx['replicate']}")

    def after_replicate(self, experiment, ctx):
        self.events.append(("after_replicate", ctx["replicate"], ctx["condition"]))
        ctx.metrics.add("seen_by_after", len(ctx.metrics.as_dict().get("stamp_len", ())))

    def on_run_result(self, experiment, run):
        self.events.append(("on_run_result", run.replicate, run.condition))

    def after_run(self, experiment, result):
        self.events.append(("after_run", len(result.runs)))


@pipeline_step()
def read_stamp(data, ctx):
    ctx.metrics.add("stamp_len", len(ctx["stamp"]))
    return data


def test_plugin_hook_order_under_serial():
    rec = Recorder()
    exp = Experiment(
        lambda ctx: [1],
        Pipeline([read_stamp()]),
        plugins=[rec],
        treatments=[Treatment("tt", {"k": 1})],
        replicates=2,
        name="hooks",
    )
    result = exp.run()
    expected = [("before_run", "hooks")]
    for r in range(2):
        for c in ("baseline", "tt"):
            expected += [("before_replicate", r, c), ("after_replicate", r, c), ("on_run_result", r, c)]
    expected.append(("after_run", 4))
    assert rec.events == expected
    # before_replicate's ctx.add reached the step; after_replicate saw the step's metric
    assert result.metrics.baseline.metrics == {"stamp_len": [10, 10], "seen_by_after": [1, 1]}
    assert result.metrics.treatments["tt"].metrics == {"stamp_len": [4, 4], "seen_by_after": [1, 1]}


def test_replicate_hooks_run_in_process_workers_and_their_ctx_effects_come_back():
    rec = Recorder()
    exp = Experiment(
        lambda ctx: [1],
        Pipeline([read_stamp()]),
        plugins=[rec, ParallelExecution(max_workers=2, executor_type="process")],
        replicates=3,
        name="hooks",
    )
    result = exp.run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"stamp_len": [10, 10, 10], "seen_by_after": [1, 1, 1]}
    kinds = [e[0] for e in rec.events]
    # the replicate hooks ran on the workers' copies; the driver saw only its own hooks
    assert kinds == ["before_run"] + ["on_run_result"] * 3 + ["after_run"]


class BrokenAfterReplicate(BasePlugin):
    def after_replicate(self, experiment, ctx):
        raise RuntimeError("after hook broke")


def test_failing_after_replicate_hook_is_recorded_as_run_error():
    result = Experiment(
        lambda ctx: [1], Pipeline([record_total()]), plugins=[BrokenAfterReplicate()], replicates=2
    ).run()
    assert len(result.errors) == 2
    assert result.errors[0].step == "plugin BrokenAfterReplicate.after_replicate"
    assert result.errors[0].message == "after hook broke"


def test_logging_plugin_logs_start_and_finish(caplog):
    caplog.set_level(logging.INFO, logger="crystallize")
    exp = Experiment(
        lambda ctx: [1],
        Pipeline([fail_on(bad_replicate=2)]),
        plugins=[LoggingPlugin(verbose=True)],
        replicates=3,
        name="logged",
    )
    exp.run()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "Experiment 'logged' starting"
    assert messages[-1] == "Experiment 'logged' finished: 3 runs, 1 failed"
    run_lines = [m for m in messages if m.startswith("run r=")]
    assert len(run_lines) == 3
    assert any(re.match(r"run r=2 baseline: FAILED \(ValueError\)", m) for m in run_lines)
    assert any(re.match(r"run r=0 baseline: ok", m) for m in run_lines)


def test_logging_plugin_quiet_by_default_per_run(caplog):
    caplog.set_level(logging.INFO, logger="crystallize")
    Experiment(lambda ctx: [1], Pipeline([record_total()]), plugins=[LoggingPlugin()], replicates=3, name="quiet").run()
    messages = [r.getMessage() for r in caplog.records if r.name == "crystallize.experiment"]
    assert messages == ["Experiment 'quiet' starting", "Experiment 'quiet' finished: 3 runs, 0 failed"]


def test_a_near_miss_hook_name_is_reported_with_a_suggestion():
    class Typo(BasePlugin):
        def befor_run(self, experiment):  # not a hook: would silently never run
            pass

        def helper(self):  # an ordinary method is fine
            pass

    exp = Experiment(lambda ctx: 1, Pipeline([pipeline_step()(lambda data: data)()]), plugins=[Typo()])
    with pytest.raises(ValidationError, match=r"Typo defines befor_run\(\).*Did you mean before_run\(\)\?") as info:
        exp.validate()
    assert len(info.value.problems) == 1


def test_a_backend_failing_part_way_keeps_the_finished_runs_on_the_exception():
    from crystallize import ExecutionBackend, execute_run

    class DiesAfterTwo(ExecutionBackend):
        def execute(self, experiment, plan):
            for spec in plan[:2]:
                yield execute_run(experiment, spec.replicate, spec.condition)
            raise ConnectionError("cluster went away")

    @pipeline_step()
    def measure(data, ctx):
        return data, {"r": ctx["replicate"]}

    exp = Experiment(lambda ctx: 0, Pipeline([measure()]), plugins=[DiesAfterTwo()])
    with pytest.raises(ConnectionError, match="cluster went away") as info:
        exp.run(replicates=5)
    partial = info.value.partial_result
    assert partial.metrics.baseline.metrics == {"r": [0, 1]}
    assert partial.provenance["complete"] is False


def test_failed_runs_are_announced_in_the_log(caplog):
    @pipeline_step()
    def picky(data, ctx):
        if ctx["replicate"] == 1:
            raise KeyError("missing column 'age'")
        return data

    exp = Experiment(lambda ctx: 0, Pipeline([picky()]), name="survey")
    with caplog.at_level(logging.WARNING, logger="crystallize.experiment"):
        result = exp.run(replicates=3)
    assert len(result.errors) == 1
    assert "Experiment 'survey': 1 of 3 runs failed" in caplog.text
    assert "replicate 1, condition 'baseline', at picky: KeyError" in caplog.text
