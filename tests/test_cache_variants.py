"""Conditional reads: a step whose reads depend on what it read hits every variant.

``if ctx.get("mode") == "a": ctx.get("alpha") else: ctx.get("beta")`` makes entries
with different sets of read keys for one (step, input). Each must be found again,
with a bounded number of store reads, and never be served to a context it does not
match. Executions are counted in a file; store reads by a real store that counts.
"""

from __future__ import annotations

import pytest
from _counting import count_call, executions, start_counting

from crystallize import (
    Experiment,
    FrozenContext,
    LocalCacheStore,
    ParallelExecution,
    Pipeline,
    Treatment,
    pipeline_step,
)
from crystallize.cache import MAX_KEY_SETS


@pytest.fixture(autouse=True)
def counter(tmp_path, monkeypatch):
    return start_counting(tmp_path, monkeypatch)


class CountingStore(LocalCacheStore):
    """A real local store that counts the reads the cache makes."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.gets = 0

    def get(self, namespace, key):
        self.gets += 1
        return super().get(namespace, key)


@pipeline_step(cacheable=True)
def branchy(data, ctx):
    count_call()
    if ctx.get("mode") == "a":
        value = ctx.get("alpha")
    else:
        value = ctx.get("beta")
    return data + value, {"value": value}


TREATMENTS = [
    Treatment("b", {"mode": "b"}),
    Treatment("a2", {"alpha": 2}),
    Treatment("b2", {"mode": "b", "beta": 20}),
]


def sweep(store, backend=None) -> Experiment:
    return Experiment(
        datasource=lambda ctx: 100,
        pipeline=[branchy()],
        plugins=[backend] if backend else [],
        treatments=TREATMENTS,
        replicates=2,
        initial_ctx={"mode": "a", "alpha": 1, "beta": 10},
        cache=store,
    )


def metrics(result):
    assert result.errors == []
    return result.metrics.baseline.metrics, {n: t.metrics for n, t in result.metrics.treatments.items()}


def test_three_passes_over_branches_hit_on_the_second_and_third(tmp_path, counter):
    store = CountingStore(tmp_path / "cache")
    first = sweep(store).run()
    assert executions(counter) == 4  # one per branch and value; replicate 1 hits
    assert metrics(first)[0] == {"value": [1, 1]}
    assert metrics(first)[1] == {
        "b": {"value": [10, 10]},
        "a2": {"value": [2, 2]},
        "b2": {"value": [20, 20]},
    }
    for _ in range(2):
        store.gets = 0
        again = sweep(store).run()
        assert executions(counter) == 4, "a pass after the first executed the step"
        assert metrics(again) == metrics(first)
        assert {p.cache for run in again.runs for p in run.provenance} == {"hit"}
        # Primary, the variant with the primary's keys, the index, one other set.
        assert store.gets <= 4 * len(again.runs)


def test_branches_hit_under_a_process_pool(tmp_path, counter):
    def backend():
        return ParallelExecution(max_workers=2, executor_type="process")

    reference = metrics(sweep(False).run())
    cold = sweep(LocalCacheStore(tmp_path / "cache"), backend()).run()
    ran = executions(counter)
    warm = sweep(LocalCacheStore(tmp_path / "cache"), backend()).run()
    assert metrics(cold) == metrics(warm) == reference
    # Concurrent writers of one index may lose a set; the next pass puts it back.
    third = sweep(LocalCacheStore(tmp_path / "cache"), backend()).run()
    assert metrics(third) == reference
    assert executions(counter) - ran <= 4


def test_a_variant_is_never_served_to_a_context_it_does_not_match(tmp_path):
    store = LocalCacheStore(tmp_path / "cache")
    pipeline = Pipeline([branchy()])
    contexts = [
        {"mode": "a", "alpha": 1},
        {"mode": "b", "beta": 1},
        {"mode": "b", "beta": 2},
        {"mode": "a", "alpha": 2},
        {"mode": "c", "beta": 3},
        {"mode": "a", "alpha": 1, "beta": 99},  # beta is not read in this branch: a hit
    ]
    for values in contexts * 2:
        ctx = FrozenContext(values)
        expected = values["alpha"] if values["mode"] == "a" else values["beta"]
        assert pipeline.run(0, ctx, cache=store) == expected
    ctx = FrozenContext(contexts[-1])
    pipeline.run(0, ctx, cache=store)
    assert ctx.provenance[0].cache == "hit"


@pipeline_step(cacheable=True)
def pick(data, ctx):
    count_call()
    name = ctx.get("which")
    return ctx.get(name)


def test_more_key_sets_than_the_index_keeps_stay_correct(tmp_path, counter):
    store = LocalCacheStore(tmp_path / "cache")
    names = [f"k{i}" for i in range(MAX_KEY_SETS + 3)]
    values = {name: i for i, name in enumerate(names)}

    def pass_over():
        for name in names:
            ctx = FrozenContext({**values, "which": name})
            assert Pipeline([pick()]).run(0, ctx, cache=store) == values[name]

    pass_over()
    ran = executions(counter)
    assert ran == len(names)
    for _ in range(2):
        pass_over()
        # The primary's set and the first MAX_KEY_SETS others hit, the rest run
        # each time: a full index is kept, not churned.
        assert executions(counter) - ran == len(names) - 1 - MAX_KEY_SETS
        ran = executions(counter)
