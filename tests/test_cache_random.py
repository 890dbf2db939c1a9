"""Randomness and the step cache: keyed by the generators' state at entry, replayed after.

Every pattern draws in a cacheable step and again in a later uncached step, under
``SeedPlugin(seed=7)``: with the cache off, on a cold cache and on a warm one, every
backend must give the same metrics. A hit that did not advance the generator would
hand the later step the numbers the cached step drew; a key blind to the generator's
state would give every replicate the first replicate's draw. Executions are counted
in a file, so process workers count too.
"""

from __future__ import annotations

import logging
import random
import sys

import numpy as np
import pytest
from _counting import count_call, executions, start_counting

from crystallize import (
    AsyncExecution,
    Experiment,
    FrozenContext,
    ParallelExecution,
    Pipeline,
    SeedPlugin,
    SerialExecution,
    Treatment,
    pipeline_step,
)


@pytest.fixture(autouse=True)
def counter(tmp_path, monkeypatch):
    return start_counting(tmp_path, monkeypatch)


def draw(pattern: str, ctx) -> float:
    if pattern == "random":
        return random.random()
    if pattern == "numpy":
        return float(np.random.random())
    if pattern == "rng":
        return ctx["rng"].random()
    if pattern == "numpy_rng":
        return float(ctx["numpy_rng"].normal())
    if pattern == "torch":
        return float(sys.modules["torch"].rand(1)[0])
    raise ValueError(pattern)


@pipeline_step(cacheable=True)
def cached_draw(data, ctx, *, pattern, scale=1.0):
    count_call()
    return data, {"drawn": scale * draw(pattern, ctx)}


@pipeline_step()
def later_draw(data, ctx, *, pattern):
    ctx.metrics.add("later", draw(pattern, ctx))
    return data


@pipeline_step(cacheable=True)
def no_draw(data, ctx):
    count_call()
    return data + 1


BACKENDS = {
    "serial": lambda: SerialExecution(),
    "thread": lambda: ParallelExecution(max_workers=2, executor_type="thread"),
    "process": lambda: ParallelExecution(max_workers=2, executor_type="process"),
    "async": lambda: AsyncExecution(),
}
PER_RUN = ["rng", "numpy_rng"]
GLOBAL = ["random", "numpy"]
# Global generators are shared by concurrent threads: not reproducible there.
CASES = [(p, b) for p in PER_RUN + GLOBAL for b in BACKENDS if not (p in GLOBAL and b == "thread")]


def experiment(pattern: str, backend: str, cache) -> Experiment:
    return Experiment(
        datasource=lambda ctx: 0,
        pipeline=[cached_draw(), later_draw()],
        plugins=[SeedPlugin(seed=7), BACKENDS[backend]()],
        treatments=[Treatment("double", {"scale": 2.0})],
        replicates=4,
        initial_ctx={"pattern": pattern},
        cache=cache,
    )


def outcome(result):
    assert result.errors == []
    return result.metrics.baseline.metrics, result.metrics.treatments["double"].metrics


def statuses(result) -> list[str]:
    return [run.provenance[0].cache for run in result.runs]


@pytest.mark.parametrize(("pattern", "backend"), CASES)
def test_cache_off_cold_and_warm_give_the_same_draws(pattern, backend, counter):
    off = outcome(experiment(pattern, backend, False).run())
    assert executions(counter) == 8
    cold = experiment(pattern, backend, None).run()
    assert executions(counter) == 16  # 4 replicates x 2 conditions, all keyed apart
    warm = experiment(pattern, backend, None).run()

    assert outcome(cold) == off
    assert outcome(warm) == off
    baseline, treated = off
    assert len(set(baseline["drawn"])) == 4, "every replicate draws its own numbers"
    # Common random numbers: the treatment drew what the baseline drew, then doubled.
    assert treated["drawn"] == [2 * x for x in baseline["drawn"]]
    assert treated["later"] == baseline["later"]
    if backend != "thread":  # other runs reseeding the globals may cost a thread run a hit
        assert executions(counter) == 16, "the warm run executed the cached step"
        assert statuses(warm) == ["hit"] * 8


def test_torch_global_generator_is_keyed_and_replayed(counter):
    pytest.importorskip("torch")
    off = outcome(experiment("torch", "serial", False).run())
    cold = outcome(experiment("torch", "serial", None).run())
    warm = experiment("torch", "serial", None).run()
    assert cold == outcome(warm) == off
    assert len(set(off[0]["drawn"])) == 4
    assert statuses(warm) == ["hit"] * 8


def test_a_step_that_draws_nothing_keeps_one_entry_for_every_seed(counter):
    exp = Experiment(
        lambda ctx: 0,
        [no_draw(), later_draw()],
        plugins=[SeedPlugin(seed=7)],
        replicates=4,
        initial_ctx={"pattern": "numpy"},
    )
    first = exp.run()
    assert executions(counter) == 1
    assert statuses(first) == ["miss", "hit", "hit", "hit"]
    assert [r for r in first.runs[0].provenance[0].reads if isinstance(r, tuple)] == []


def test_the_entry_records_the_generators_drawn_from_as_reads():
    ctx = FrozenContext({"rng": random.Random(1), "other": random.Random(2), "pattern": "rng"})
    Pipeline([cached_draw()]).run(0, ctx)
    (record,) = ctx.provenance
    assert ("crystallize", "random", "ctx:rng") in record.reads
    assert ("crystallize", "random", "ctx:other") not in record.reads  # not drawn from
    assert ("crystallize", "random", "numpy") not in record.reads


def test_a_hit_leaves_every_generator_where_the_step_left_it():
    def fresh():
        return FrozenContext({"generator": random.Random(3)})

    @pipeline_step(cacheable=True)
    def both(data, ctx):
        count_call()
        return data + ctx["generator"].random() + random.random() + float(np.random.random())

    def after(ctx):
        return (
            ctx.peek("generator").random(),
            random.random(),
            float(np.random.random()),
        )

    results = []
    for _ in range(3):  # cold, then two hits
        random.seed(11)
        np.random.seed(11)
        ctx = fresh()
        out = Pipeline([both()]).run(0, ctx)
        results.append((out, after(ctx), ctx.provenance[0].cache))
    assert [r[2] for r in results] == ["miss", "hit", "hit"]
    assert results[0][:2] == results[1][:2] == results[2][:2]


def test_a_generator_in_another_state_misses_and_says_so(counter, caplog):
    pipeline = Pipeline([cached_draw()])
    first = FrozenContext({"rng": random.Random(1), "pattern": "rng"})
    pipeline.run(0, first)
    second = FrozenContext({"rng": random.Random(2), "pattern": "rng"})
    with caplog.at_level(logging.DEBUG, logger="crystallize.cache"):
        pipeline.run(0, second)
    assert executions(counter) == 2
    reason = second.provenance[0].miss_reason
    assert reason == "randomness changed: ctx:rng"
    assert reason in caplog.text


def test_a_system_random_in_the_context_is_ignored_not_fatal(counter):
    @pipeline_step(cacheable=True)
    def plain(data):
        count_call()
        return data * 2

    for _ in range(2):
        ctx = FrozenContext({"sysrand": random.SystemRandom()})
        assert Pipeline([plain()]).run(2, ctx) == 4
    assert executions(counter) == 1
