"""SeedPlugin: per-run seeds from (seed, replicate) only, the same on every backend."""

from __future__ import annotations

import random

import numpy as np
import pytest

from crystallize import (
    AsyncExecution,
    Experiment,
    ParallelExecution,
    Pipeline,
    SeedPlugin,
    SerialExecution,
    Treatment,
    pipeline_step,
)


@pipeline_step()
def inspect_seed(data, ctx):
    ctx.metrics.add("seed", ctx["seed"])
    ctx.metrics.add("rng_is_random", isinstance(ctx["rng"], random.Random))
    ctx.metrics.add("numpy_rng_is_generator", isinstance(ctx["numpy_rng"], np.random.Generator))
    return data


@pipeline_step()
def draw(data, ctx):
    ctx.metrics.add("draw", ctx["rng"].random())
    ctx.metrics.add("np_draw", float(ctx["numpy_rng"].normal()))
    return data


@pipeline_step()
def draw_global(data, ctx):
    ctx.metrics.add("global", random.random())
    ctx.metrics.add("np_global", float(np.random.random()))
    return data


BACKENDS = {
    "serial": lambda: SerialExecution(),
    "thread": lambda: ParallelExecution(max_workers=2, executor_type="thread"),
    "process": lambda: ParallelExecution(max_workers=2, executor_type="process"),
    "async": lambda: AsyncExecution(),
}


def _experiment(steps, *plugins, replicates=4, treatments=None):
    return Experiment(
        lambda ctx: None,
        Pipeline(steps),
        plugins=list(plugins),
        treatments=treatments or [Treatment("t", {"k": 1})],
        replicates=replicates,
    )


def test_seed_readable_as_ctx_seed_rng_and_numpy_rng():
    plugin = SeedPlugin(seed=7)
    result = _experiment([inspect_seed()], plugin).run()
    assert result.errors == []
    for run in result.runs:
        assert run.metrics["rng_is_random"] == [True]
        assert run.metrics["numpy_rng_is_generator"] == [True]
        assert run.metrics["seed"] == [run.seed]
        assert run.seed == plugin.seed_for(run.replicate)


def test_seed_depends_only_on_seed_and_replicate():
    result = _experiment(
        [draw()], SeedPlugin(seed=7), treatments=[Treatment("a", {"k": 1}), Treatment("b", {"k": 2})]
    ).run()
    for r in range(4):
        seeds = {result.run(r, c).seed for c in ("baseline", "a", "b")}
        draws = {result.run(r, c).metrics["draw"][0] for c in ("baseline", "a", "b")}
        assert len(seeds) == 1 and len(draws) == 1
        (seed,) = seeds
        assert result.run(r).metrics["draw"] == [random.Random(seed).random()]
        assert result.run(r).metrics["np_draw"] == [float(np.random.default_rng(seed).normal())]
    assert len({result.run(r).seed for r in range(4)}) == 4
    # a new base seed gives new run seeds; the same base seed gives the same ones
    other = _experiment([draw()], SeedPlugin(seed=8)).run()
    again = _experiment([draw()], SeedPlugin(seed=7)).run()
    assert [other.run(r).seed for r in range(4)] != [result.run(r).seed for r in range(4)]
    assert [again.run(r).seed for r in range(4)] == [result.run(r).seed for r in range(4)]
    assert SeedPlugin(seed=7).seed_for(3) == result.run(3).seed


def test_rng_metrics_identical_across_every_local_backend():
    outcomes = {}
    for name, backend in BACKENDS.items():
        result = _experiment([draw()], SeedPlugin(seed=7), backend()).run()
        assert result.errors == [], name
        outcomes[name] = (
            result.metrics.baseline.metrics,
            result.metrics.treatments["t"].metrics,
            [(r.replicate, r.condition, r.seed) for r in result.runs],
        )
    reference = outcomes["serial"]
    assert len(reference[0]["draw"]) == 4
    for name, outcome in outcomes.items():
        assert outcome == reference, name
    # the baseline and the treatment drew the same numbers (common random numbers)
    assert reference[0] == reference[1]


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_default_seed_fn_seeds_global_random_and_numpy(backend):
    first = _experiment([draw_global()], SeedPlugin(seed=7), BACKENDS[backend]()).run()
    second = _experiment([draw_global()], SeedPlugin(seed=7), BACKENDS[backend]()).run()
    assert first.errors == []
    assert first.metrics.baseline.metrics == second.metrics.baseline.metrics
    for run in first.runs:
        assert run.metrics["global"] == [random.Random(run.seed).random()]
        assert run.metrics["np_global"] == [float(np.random.RandomState(run.seed).random_sample())]
    assert len(set(first.metrics.baseline.metrics["global"])) == 4


def test_serial_and_process_global_random_agree():
    serial = _experiment([draw_global()], SeedPlugin(seed=3), BACKENDS["serial"]()).run()
    process = _experiment([draw_global()], SeedPlugin(seed=3), BACKENDS["process"]()).run()
    assert serial.metrics.baseline.metrics == process.metrics.baseline.metrics
    assert serial.metrics.treatments["t"].metrics == process.metrics.treatments["t"].metrics


def test_seed_none_draws_a_recorded_seed_that_reproduces():
    plugin = SeedPlugin(seed=None)
    first = _experiment([draw()], plugin).run()
    drawn = first.provenance["seed"]
    assert isinstance(drawn, int)
    second = _experiment([draw()], plugin).run()
    assert second.provenance["seed"] != drawn  # a fresh draw per run() (1 in 2**32 to collide)
    replay = _experiment([draw()], SeedPlugin(seed=drawn)).run()
    assert replay.provenance["seed"] == drawn
    assert replay.metrics.baseline.metrics == first.metrics.baseline.metrics
    assert [r.seed for r in replay.runs] == [r.seed for r in first.runs]


def test_seed_none_is_drawn_in_the_driver_for_process_workers():
    result = _experiment([draw()], SeedPlugin(), BACKENDS["process"]()).run()
    drawn = result.provenance["seed"]
    replay = _experiment([draw()], SeedPlugin(seed=drawn)).run()
    assert replay.metrics.baseline.metrics == result.metrics.baseline.metrics


def test_custom_seed_fn_called_with_each_runs_seed():
    calls = []
    result = _experiment(
        [draw()], SeedPlugin(seed=7, seed_fn=calls.append), treatments=[Treatment("a", {"k": 1})], replicates=3
    ).run()
    assert sorted(calls) == sorted(run.seed for run in result.runs)
    assert len(calls) == 6


def test_seed_fn_replaces_default_global_seeding():
    random.seed(12345)
    expected_next = random.Random(12345).random()
    _experiment([draw()], SeedPlugin(seed=7, seed_fn=lambda s: None), replicates=1).run()
    # nothing re-seeded or consumed the global generator
    assert random.random() == expected_next


def test_no_seed_plugin_means_no_seed():
    result = _experiment([draw_global()], replicates=2).run()
    assert all(run.seed is None for run in result.runs)
    assert result.provenance["seed"] is None
