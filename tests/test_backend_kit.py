"""The backend kit and the house rules it enforces: a backend written against
``crystallize.backend`` alone, every planned run back exactly once, options checked
at construction, one injection module, set-up and tear-down failures."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from crystallize import (
    AsyncExecution,
    BackendError,
    ConfigurationError,
    Experiment,
    ParallelExecution,
    Pipeline,
    PipelineStep,
    SerialExecution,
    Treatment,
    ValidationError,
    data_source,
    pipeline_step,
)
from crystallize.backend import ExecutionBackend, check_option, is_int, steps_set_up


# -- the README's example backend, verbatim ------------------------------------------
class EveryOther(ExecutionBackend):
    """Runs even replicates first, then odd ones, in this process."""

    def __init__(self, chunk: int = 1) -> None:
        check_option("EveryOther", "chunk", chunk, lambda v: is_int(v, 1), "an integer >= 1")
        self.chunk = chunk

    def execute(self, experiment, plan):
        with steps_set_up(experiment) as host:  # setup() once, teardown() at the end
            for spec in sorted(plan, key=lambda s: s.replicate % 2):
                yield host.run(spec.replicate, spec.condition)  # never raises but for Ctrl-C


@pipeline_step()
def record(data, ctx, *, factor=1):
    return data, {"x": ctx["replicate"] * factor}


def _exp(backend, **kwargs):
    return Experiment(
        lambda ctx: 0,
        Pipeline([record()]),
        plugins=[backend],
        treatments=[Treatment("double", {"factor": 2})],
        **kwargs,
    )


def test_a_backend_written_against_the_kit_gives_serial_results():
    ours = _exp(EveryOther()).run(replicates=4)
    serial = _exp(SerialExecution()).run(replicates=4)
    assert ours.errors == []
    assert ours.metrics.baseline.metrics == serial.metrics.baseline.metrics == {"x": [0, 1, 2, 3]}
    assert ours.metrics.treatments["double"].metrics == {"x": [0, 2, 4, 6]}


def test_the_kit_example_validates_its_option():
    with pytest.raises(ConfigurationError, match=r"EveryOther\(chunk=0\): chunk must be an integer >= 1"):
        EveryOther(chunk=0)


class _Losing(ExecutionBackend):
    def execute(self, experiment, plan):
        with steps_set_up(experiment) as host:
            for spec in plan[:-1]:
                yield host.run(spec.replicate, spec.condition)


class _Duplicating(ExecutionBackend):
    def execute(self, experiment, plan):
        with steps_set_up(experiment) as host:
            for spec in plan:
                yield host.run(spec.replicate, spec.condition)
            yield host.run(plan[0].replicate, plan[0].condition)


def test_a_backend_that_loses_a_run_fails_loudly_with_what_finished():
    with pytest.raises(BackendError, match=r"returned 5 of 6 planned runs; missing: \(replicate 2, 'double'\)") as info:
        _exp(_Losing()).run(replicates=3)
    assert len(info.value.partial_result.runs) == 5


def test_a_backend_that_returns_a_run_twice_fails_loudly():
    with pytest.raises(BackendError, match=r"replicate 0, condition 'baseline' twice") as info:
        _exp(_Duplicating()).run(replicates=2)
    assert len(info.value.partial_result.runs) == 4


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: ParallelExecution(batch_size=-1), "batch_size"),
        (lambda: ParallelExecution(batch_size=0, executor_type="process"), "batch_size"),
        (lambda: ParallelExecution(max_workers=0), "max_workers"),
        (lambda: ParallelExecution(max_retries=-1), "max_retries"),
        (lambda: ParallelExecution(executor_type="fiber"), "executor_type"),
        (lambda: ParallelExecution(start_method="teleport"), "start_method"),
        (lambda: ParallelExecution(threads_per_worker=0), "threads_per_worker"),
        (lambda: ParallelExecution(max_workers=2.5), "max_workers"),
        (lambda: AsyncExecution(max_concurrency=0), "max_concurrency"),
    ],
)
def test_backends_check_their_options_when_built(make, option):
    with pytest.raises(ConfigurationError, match=rf"\({option}=") as info:
        make()
    assert info.value.option == option
    assert isinstance(info.value, ValueError)


def test_an_experiment_cache_that_is_not_a_store_fails_validation_naming_cache():
    exp = _exp(SerialExecution(), cache=42)
    with pytest.raises(ValidationError, match=r"cache must be a cache store, a directory path, False"):
        exp.validate()
    with pytest.raises(ValidationError, match="cache"):
        exp.run()


@pipeline_step(cacheable=True)
def counted(data, *, calls_file):
    with open(calls_file, "a") as fh:
        fh.write("call\n")
    return data, {"y": 1}


def test_an_experiment_cache_given_as_a_path_is_used(tmp_path):
    calls = tmp_path / "calls.txt"
    for _ in range(2):
        result = Experiment(lambda ctx: 1, Pipeline([counted(calls_file=str(calls))]), cache=str(tmp_path / "c")).run(
            replicates=2
        )
        assert result.metrics.baseline.metrics == {"y": [1, 1]}
    assert calls.read_text().count("call") == 1
    assert any((tmp_path / "c").iterdir())


# -- one injection module: the drifted cases ------------------------------------------
def test_a_data_source_with_kwargs_is_not_asked_for_a_parameter_named_kwargs():
    @data_source
    def source(ctx, n=2, **extra):
        return [n, sorted(extra)]

    result = Experiment(source(), Pipeline([_echo()])).run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"data": [[2, []]]}
    assert Experiment(source(n=3, colour="red"), Pipeline([_echo()])).run().metrics.baseline.metrics == {
        "data": [[3, ["colour"]]]
    }


@pipeline_step()
def _echo(data):
    return data, {"data": data}


def test_values_injected_into_a_data_source_are_its_own_copies():
    @data_source
    def source(ctx, items):
        items.append("edited")
        return list(items)

    exp = Experiment(source(), Pipeline([_echo()]), initial_ctx={"items": ["a"]})
    result = exp.run(replicates=3)
    assert result.metrics.baseline.metrics == {"data": [["a", "edited"]] * 3}
    assert exp.initial_ctx == {"items": ["a"]}


def test_a_steps_mutable_default_is_copied_per_call():
    @pipeline_step()
    def collect(data, *, seen=[]):  # noqa: B006 - the point of the test
        seen.append(data)
        return data, {"seen": len(seen)}

    result = Experiment(lambda ctx: ctx["replicate"], Pipeline([collect()])).run(replicates=4)
    assert result.metrics.baseline.metrics == {"seen": [1, 1, 1, 1]}


# -- naming the failing step ------------------------------------------------------------
@pipeline_step()
def needs_missing(data, *, absent):
    return data


@pipeline_step()
def outer(data, ctx):
    ctx.metrics.add("before", 1)
    Pipeline([record()]).run(data, ctx)  # a sub-pipeline adds provenance records
    return Pipeline([needs_missing()]).run(data)


def test_a_parameter_error_after_a_sub_pipeline_names_the_step_and_only_fails_its_run():
    result = Experiment(lambda ctx: 1, Pipeline([outer(), record()])).run(replicates=2)
    assert len(result.errors) == 2
    error = result.errors[0]
    assert (error.step, error.type) == ("outer", "MissingParameterError")
    assert "'absent'" in error.message


def test_a_missing_parameter_names_its_own_step():
    result = Experiment(lambda ctx: 1, Pipeline([record(), needs_missing()])).run()
    assert (result.errors[0].step, result.errors[0].type) == ("needs_missing", "MissingParameterError")


class LoudTeardown(PipelineStep):
    def __call__(self, data, ctx):
        return data, {"ok": 1}

    def teardown(self, ctx):
        raise OSError("disk gone while tearing down")


def test_a_failing_teardown_is_logged_not_swallowed_and_results_stand(caplog):
    with caplog.at_level(logging.ERROR, logger="crystallize"):
        result = Experiment(lambda ctx: 1, Pipeline([LoudTeardown()])).run(replicates=2)
    assert result.metrics.baseline.metrics == {"ok": [1, 1]}
    assert any("LoudTeardown" in r.getMessage() and "teardown() raised" in r.getMessage() for r in caplog.records)


def test_thread_pool_with_seed_plugin_imports_numpy_once_in_the_driver(tmp_path):
    # numpy installed but not yet imported when run() starts: several threads
    # importing it at once used to fail 48 of 50 runs.
    pytest.importorskip("numpy")
    script = tmp_path / "seeded_threads.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        from crystallize import Experiment, ParallelExecution, Pipeline, SeedPlugin, pipeline_step

        @pipeline_step()
        def draw(data, ctx):
            return data, {"x": float(ctx["numpy_rng"].random())}

        assert "numpy" not in sys.modules
        exp = Experiment(lambda ctx: 0, Pipeline([draw()]),
                         plugins=[SeedPlugin(seed=3), ParallelExecution(max_workers=8)])
        result = exp.run(replicates=50)
        print(len(result.errors), len(set(result.metrics.baseline.metrics["x"])))
    """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "50"]


class ExitInTeardown(PipelineStep):
    def __call__(self, data, ctx):
        return data, {"ok": 1}

    def teardown(self, ctx):
        raise SystemExit(3)


def test_sys_exit_in_a_teardown_does_not_escape_run(caplog):
    with caplog.at_level(logging.ERROR, logger="crystallize"):
        result = Experiment(lambda ctx: 1, Pipeline([ExitInTeardown()])).run(replicates=2)
    assert result.metrics.baseline.metrics == {"ok": [1, 1]}
    assert any("ExitInTeardown" in r.getMessage() for r in caplog.records)
