"""The backend kit's step invokers: a step hosted elsewhere, its effects replayed in the run.

A small backend written against ``crystallize.backend`` alone hosts the heavy steps
"elsewhere" — rebuilt from their recipe, set up once, every call and every result
pickled both ways as a real transport would — and must give exactly the results,
provenance and cache entries of SerialExecution.
"""

from __future__ import annotations

import pickle
import random

import cloudpickle
import pytest

from crystallize import (
    Artifact,
    ArtifactPlugin,
    Experiment,
    Pipeline,
    PipelineStep,
    SeedPlugin,
    SerialExecution,
    Treatment,
    pipeline_step,
)
from crystallize.backend import (
    ExecutionBackend,
    StepEffects,
    call_step,
    deserialize_step,
    host_steps,
    serialize_experiment,
    serialize_step,
    steps_set_up,
)

np = pytest.importorskip("numpy")


def travel(obj):
    return pickle.loads(pickle.dumps(obj))


class Hosting(ExecutionBackend):
    """Hosts every heavy step in a rebuilt copy; calls and effects travel pickled."""

    def __init__(self):
        self.calls = 0
        self.setups = 0

    def execute(self, experiment, plan):
        heavy = [i for i, step in enumerate(experiment.pipeline.steps) if step.heavy]
        hosted = {}
        for index in heavy:
            (step, initial) = deserialize_step(
                serialize_step(experiment.pipeline.steps[index], dict(experiment.initial_ctx))
            )
            step.setup(initial)
            self.setups += 1
            hosted[index] = step

        def invoker_for(index):
            def invoke(stand_in, data, call):
                self.calls += 1
                return travel(call_step(hosted[index], travel(data), travel(call)))

            return invoke

        job = host_steps(experiment, heavy)
        with steps_set_up(job, invokers={i: invoker_for(i) for i in heavy}) as host:
            for spec in plan:
                yield travel(host.run(spec.replicate, spec.condition))


class Model(PipelineStep):
    """Draws from every kind of generator, reads the metrics, adds a key, writes an artifact."""

    heavy = True

    def __init__(self, scale: float):
        self.scale = scale

    def setup(self, ctx):
        self.weights = np.full(3, self.scale)

    def __call__(self, data, ctx):
        seen = len(ctx.metrics)
        noise = ctx["rng"].random() + random.random() + float(np.random.random()) + ctx["numpy_rng"].random()
        ctx.add("noise", noise)
        Artifact("model/noise.txt").write(f"{noise:.6f}")
        out = data * self.weights + noise
        return out, {"model": float(out.sum()), "seen": seen}


@pipeline_step()
def after(data, ctx, *, offset: float = 0.0):
    # Light steps after the hosted one must draw exactly what they would have.
    return data, {
        "after": float(data.sum())
        + offset
        + random.random()
        + float(np.random.random())
        + ctx["rng"].random()
        + ctx["noise"]
    }


@pipeline_step()
def before(data, ctx):
    return data, {"before": random.random()}


def _experiment(backend, tmp_path, **kwargs):
    return Experiment(
        lambda ctx: np.arange(3.0) + ctx["replicate"],
        Pipeline([before(), Model(2.0), after()]),
        plugins=[SeedPlugin(seed=11), backend, ArtifactPlugin(tmp_path / "artifacts")],
        treatments=[Treatment("shifted", {"offset": 5.0})],
        name="hosted",
        **kwargs,
    )


def test_a_hosted_step_gives_serial_results_provenance_and_artifacts(tmp_path):
    hosting = Hosting()
    hosted = _experiment(hosting, tmp_path / "h").run(replicates=4)
    serial = _experiment(SerialExecution(), tmp_path / "s").run(replicates=4)
    assert hosted.errors == [] and hosting.calls == 8 and hosting.setups == 1
    assert hosted.metrics.baseline.metrics == serial.metrics.baseline.metrics
    assert hosted.metrics.treatments["shifted"].metrics == serial.metrics.treatments["shifted"].metrics
    for ours, theirs in zip(hosted.runs, serial.runs):
        mine, ref = ours.provenance[1], theirs.provenance[1]
        assert (mine.name, mine.reads, mine.added, mine.params) == (ref.name, ref.reads, ref.added, ref.params)
        assert mine.served_by is None  # this backend does not say where
    texts = sorted(p.read_text() for p in (tmp_path / "h" / "artifacts").rglob("noise.txt"))
    assert texts == sorted(p.read_text() for p in (tmp_path / "s" / "artifacts").rglob("noise.txt"))
    assert len(texts) == 8


class CachedModel(PipelineStep):
    heavy = True
    cacheable = True

    def __call__(self, data, ctx):
        return data * 2, {"drawn": ctx["rng"].random()}


def test_the_cache_is_looked_up_in_the_run_before_the_invoker_and_entries_are_shared(tmp_path):
    def build(backend):
        return Experiment(
            lambda ctx: np.arange(3.0),
            Pipeline([CachedModel()]),
            plugins=[SeedPlugin(seed=3), backend],
            cache=str(tmp_path / "cache"),
            name="cached",
        )

    hosting = Hosting()
    first = build(hosting).run(replicates=3)
    assert hosting.calls == 3 and {r.provenance[0].cache for r in first.runs} == {"miss"}
    again = Hosting()
    second = build(again).run(replicates=3)
    assert again.calls == 0 and {r.provenance[0].cache for r in second.runs} == {"hit"}
    serial = build(SerialExecution()).run(replicates=3)  # an entry the hosted step stored, hit serially
    assert {r.provenance[0].cache for r in serial.runs} == {"hit"}
    assert first.metrics.baseline.metrics == second.metrics.baseline.metrics == serial.metrics.baseline.metrics


class Failing(PipelineStep):
    heavy = True

    def __call__(self, data, ctx):
        if ctx["replicate"] == 1:
            raise KeyError("no such token")
        return data


def test_a_hosted_step_that_raises_fails_its_run_as_the_step_would():
    result = Experiment(lambda ctx: 0, Pipeline([Failing()]), plugins=[Hosting()], name="failing").run(replicates=3)
    assert [(e.replicate, e.step, e.type) for e in result.errors] == [(1, "Failing", "KeyError")]


def test_a_stand_in_without_an_invoker_says_it_is_hosted_elsewhere():
    job = host_steps(Experiment(lambda ctx: 0, Pipeline([Failing()]), name="orphan"), [0])
    with steps_set_up(job) as host:
        run = host.run(0, "baseline")
    assert run.error.step == "Failing" and "no invoker" in run.error.message


def test_effects_travel_as_compact_bytes_and_come_back_equal():
    effects = StepEffects(
        output=np.arange(4.0),
        metrics=[("m", 1)],
        added=[("k", random.Random(3))],
        reads=("k",),
        randomness={("crystallize", "random", "random"): random.getstate()},
    )
    back = travel(effects)
    assert back.metrics == effects.metrics and back.reads == effects.reads
    assert back.added[0][1].random() == random.Random(3).random()
    assert back.randomness == effects.randomness and list(back.output) == [0.0, 1.0, 2.0, 3.0]


def test_this_module_travels_by_value_and_the_registry_is_left_as_it_was(tmp_path):
    before = set(cloudpickle.list_registry_pickle_by_value())
    blob = serialize_experiment(_experiment(SerialExecution(), tmp_path))
    assert set(cloudpickle.list_registry_pickle_by_value()) == before and __name__ not in before
    assert __file__.encode() in blob  # its source and file name travelled with its code
    assert b"def after(data, ctx" in blob
