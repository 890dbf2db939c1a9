"""Misses explain themselves: provenance and the ``crystallize.cache`` log say what changed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from crystallize import (
    Experiment,
    FrozenContext,
    LocalCacheStore,
    Pipeline,
    PipelineStep,
    SeedPlugin,
    Treatment,
    pipeline_step,
)

THIS = sys.modules[__name__]
LIMIT = 10


@pytest.fixture
def store(tmp_path):
    return LocalCacheStore(tmp_path / "cache")


@pipeline_step(cacheable=True)
def scale(data, *, factor=1.0, lr=0.1):
    return min(data * factor + lr, LIMIT)


@pipeline_step(cacheable=True)
def read_alpha(data, ctx):
    return data + ctx.get("alpha", 0)


@pipeline_step(cacheable=True)
def noisy(data):
    return data + float(np.random.random())


class Shift(PipelineStep):
    cacheable = True

    def __init__(self, by):
        self.by = by

    def __call__(self, data, ctx):
        return data + self.by


def reasons(pipeline, store, data, **initial):
    ctx = FrozenContext(initial)
    pipeline.run(data, ctx, cache=store)
    return [(r.cache, r.miss_reason) for r in ctx.provenance]


def test_the_first_miss_and_every_hit_have_no_reason(store):
    assert reasons(Pipeline([scale(factor=2.0)]), store, 1) == [("miss", None)]
    assert reasons(Pipeline([scale(factor=2.0)]), store, 1) == [("hit", None)]
    ctx = FrozenContext()
    Pipeline([scale(factor=3.0)]).run(1, ctx, cache=False)
    assert ctx.provenance[0].miss_reason is None


def test_changed_explicit_params_are_named(store):
    reasons(Pipeline([scale(factor=2.0)]), store, 1)
    assert reasons(Pipeline([scale(factor=3.0)]), store, 1) == [("miss", "params changed: factor")]
    both = reasons(Pipeline([scale(factor=4.0, lr=0.5)]), store, 1)
    assert both == [("miss", "params changed: factor, lr")]


def test_changed_injected_values_are_named(store):
    exp = Experiment(
        lambda ctx: 1.0,
        [scale()],
        treatments=[Treatment("fast", {"lr": 0.5})],
        initial_ctx={"lr": 0.1},
        cache=store,
    )
    result = exp.run()
    assert result.run(0, "baseline").provenance[0].miss_reason is None
    assert result.run(0, "fast").provenance[0].miss_reason == "injected value changed: lr"


def test_changed_code_is_named(store, monkeypatch):
    reasons(Pipeline([scale()]), store, 1)
    monkeypatch.setattr(THIS, "LIMIT", 20)  # a module constant the step reads
    assert reasons(Pipeline([scale()]), store, 1) == [("miss", "code changed")]


def test_changed_constructor_arguments_are_named(store):
    reasons(Pipeline([Shift(1)]), store, 1)
    assert reasons(Pipeline([Shift(2)]), store, 1) == [("miss", "constructor arguments changed")]


def test_a_new_input_is_named_with_what_else_changed(store):
    reasons(Pipeline([scale(factor=2.0)]), store, 1)
    assert reasons(Pipeline([scale(factor=2.0)]), store, 2) == [("miss", "input changed")]
    assert reasons(Pipeline([scale(factor=5.0)]), store, 3) == [("miss", "params changed: factor; input changed")]
    # An input seen before is compared with the last key stored for that input.
    assert reasons(Pipeline([scale(factor=5.0)]), store, 1) == [("miss", "params changed: factor")]


def test_a_changed_ctx_read_is_named(store):
    reasons(Pipeline([read_alpha()]), store, 1, alpha=1)
    assert reasons(Pipeline([read_alpha()]), store, 1, alpha=2) == [("miss", "ctx read changed: alpha")]


def test_changed_randomness_is_named(store):
    result = Experiment(
        lambda ctx: 0.0,
        [noisy()],
        plugins=[SeedPlugin(seed=7)],
        replicates=3,
        cache=store,
    ).run()
    assert [r.provenance[0].miss_reason for r in result.runs] == [
        None,
        "randomness changed: numpy",
        "randomness changed: numpy",
    ]


def test_a_deleted_entry_is_named(store):
    (_,) = reasons(Pipeline([scale(factor=2.0)]), store, 1)
    ctx = FrozenContext()
    Pipeline([scale(factor=2.0)]).run(1, ctx, cache=store)
    record = ctx.provenance[0]
    store.delete(record.step_hash, record.input_hash)
    assert reasons(Pipeline([scale(factor=2.0)]), store, 1) == [("miss", "entry missing")]


def test_steps_at_other_positions_explain_themselves_apart(store):
    pipeline = Pipeline([scale(factor=2.0), scale(factor=3.0)])
    assert reasons(pipeline, store, 1) == [("miss", None), ("miss", None)]
    changed = Pipeline([scale(factor=2.0), scale(factor=4.0)])
    assert reasons(changed, store, 1) == [
        ("hit", None),
        ("miss", "params changed: factor"),
    ]


def test_the_cache_log_says_the_same_at_debug(store, caplog):
    reasons(Pipeline([scale(factor=2.0)]), store, 1)
    with caplog.at_level(logging.DEBUG, logger="crystallize.cache"):
        reasons(Pipeline([scale(factor=3.0)]), store, 1)
    (message,) = [r.getMessage() for r in caplog.records if "missed the cache" in r.getMessage()]
    assert "'scale'" in message and "params changed: factor" in message


# -- in a fresh interpreter, after an edit ----------------------------------------------

MODULE = """\
from crystallize import pipeline_step


@pipeline_step(cacheable=True)
def compute(data, *, factor=2):
    return {body}
"""

DRIVER = """\
import json
import sys

sys.path.insert(0, sys.argv[1])
import stepmod
from crystallize import FrozenContext, Pipeline

ctx = FrozenContext()
Pipeline([stepmod.compute(factor=int(sys.argv[2]))]).run([1, 2], ctx)
record = ctx.provenance[0]
print(json.dumps([record.cache, record.miss_reason]))
"""


def test_an_edit_seen_by_a_new_process_is_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(
        os.environ,
        CRYSTALLIZE_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONDONTWRITEBYTECODE="1",
    )

    def run(body, factor=2):
        (src / "stepmod.py").write_text(MODULE.format(body=body))
        done = subprocess.run(
            [sys.executable, str(driver), str(src), str(factor)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert run("[x * factor for x in data]") == ["miss", None]
    assert run("[x * factor for x in data]") == ["hit", None]
    assert run("[x * factor + 1 for x in data]") == ["miss", "code changed"]
    assert run("[x * factor + 1 for x in data]", factor=3) == [
        "miss",
        "params changed: factor",
    ]
