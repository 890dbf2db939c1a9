"""The step cache, counted with real calls against a real cache directory.

Call counters are attributes of a ``Calls`` object that hashes as a constant: the
code fingerprint of a step covers the module-level values it names by content, so a
counter that hashed by its counts would change the step's key on every call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from crystallize import (
    ContextMutationError,
    FrozenContext,
    LocalCacheStore,
    Pipeline,
    PipelineStep,
    StepError,
    pipeline_step,
)
from crystallize.explain import RECORD_KEY


class Calls:
    """Counts real executions of step bodies, by name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def bump(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    def __reduce_ex__(self, protocol):
        # What hash_value reads: the counts are not part of any step's identity.
        return (Calls, ())


CALLS = Calls()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache directory per test (via the environment) and a fresh counter."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CRYSTALLIZE_CACHE_DIR", str(root))
    monkeypatch.chdir(tmp_path)
    CALLS.counts.clear()
    return root


def entry_files(root: Path) -> list[Path]:
    """The cache entries under ``root`` (not the small records that explain misses)."""
    found = sorted(root.rglob("*.pkl")) if root.exists() else []
    return [p for p in found if p.name != f"{RECORD_KEY}.pkl"]


@pipeline_step(cacheable=True)
def scale_cached(data, ctx, *, factor=1.0):
    CALLS.bump("scale")
    ctx.metrics.add("length", len(data))
    ctx.add("scale_note", f"scaled by {factor}")
    scaled = [x * factor for x in data]
    return scaled, {"total": sum(scaled)}


@pipeline_step(cacheable=True)
def normalize_cached(data, ctx):
    CALLS.bump("normalize")
    scale = ctx.get("scale_factor", 1.0)
    return [x / scale for x in data]


@pipeline_step()
def plus_one(data):
    return [x + 1 for x in data]


def run(pipeline, data, cache=None, **initial):
    ctx = FrozenContext(initial)
    return pipeline.run(data, ctx, cache=cache), ctx


# -- hits and replay ------------------------------------------------------------------


def test_identical_second_run_hits_and_replays_metrics_and_ctx_additions():
    pipeline = Pipeline([scale_cached(factor=2.0)])
    out1, ctx1 = run(pipeline, [1, 2, 3])
    out2, ctx2 = run(Pipeline([scale_cached(factor=2.0)]), [1, 2, 3])

    assert CALLS["scale"] == 1
    assert out1 == out2 == [2.0, 4.0, 6.0]
    for ctx in (ctx1, ctx2):
        assert ctx.metrics["length"] == (3,)  # recorded through ctx.metrics.add
        assert ctx.metrics["total"] == (12.0,)  # recorded through a (data, metrics) return
        assert ctx["scale_note"] == "scaled by 2.0"  # added through ctx.add
    assert [r.cache for r in ctx1.provenance] == ["miss"]
    assert [r.cache for r in ctx2.provenance] == ["hit"]
    assert ctx2.provenance[0].added == ("scale_note",)


def test_a_hit_fails_like_a_run_when_its_ctx_addition_exists():
    # Uncached, the step's ctx.add of an existing key fails; a hit replaying that
    # ctx.add must fail the same way, not with a different error.
    with pytest.raises(StepError, match="'scale_cached'") as uncached:
        run(Pipeline([scale_cached]), [1], cache=False, scale_note="mine")
    run(Pipeline([scale_cached]), [1])
    with pytest.raises(StepError, match="'scale_cached'") as cached:
        run(Pipeline([scale_cached]), [1], scale_note="mine")
    for info in (uncached, cached):
        assert isinstance(info.value.__cause__, ContextMutationError)
        assert info.value.__cause__.key == "scale_note"


def test_hits_return_independent_copies():
    pipeline = Pipeline([scale_cached(factor=1.0)])
    first, _ = run(pipeline, [1, 2])
    second, _ = run(pipeline, [1, 2])
    second.append(99)
    third, _ = run(pipeline, [1, 2])
    assert third == [1.0, 2.0]
    assert CALLS["scale"] == 1


def test_a_chain_of_cached_steps_hits_all_steps():
    pipeline = Pipeline([scale_cached(factor=3.0), plus_one, normalize_cached])
    out1, _ = run(pipeline, [1, 2], scale_factor=2.0)
    out2, ctx2 = run(pipeline, [1, 2], scale_factor=2.0)
    assert out1 == out2 == [2.0, 3.5]
    assert [r.cache for r in ctx2.provenance] == ["hit", "off", "hit"]
    assert CALLS["scale"] == 1 and CALLS["normalize"] == 1


# -- what makes a miss ----------------------------------------------------------------


def test_new_explicit_params_miss():
    assert run(Pipeline([scale_cached(factor=2.0)]), [1])[0] == [2.0]
    assert run(Pipeline([scale_cached(factor=3.0)]), [1])[0] == [3.0]
    assert CALLS["scale"] == 2
    assert run(Pipeline([scale_cached(factor=2.0)]), [1])[0] == [2.0]
    assert CALLS["scale"] == 2


def test_new_input_misses():
    pipeline = Pipeline([scale_cached(factor=2.0)])
    assert run(pipeline, [1, 2])[0] == [2.0, 4.0]
    assert run(pipeline, [1, 3])[0] == [2.0, 6.0]
    assert run(pipeline, [1, 2, 3])[0] == [2.0, 4.0, 6.0]
    assert CALLS["scale"] == 3


def test_changed_injected_value_in_ctx_misses():
    # A treatment that changes an injected parameter must never be served the
    # baseline's output (the reference package's bug).
    pipeline = Pipeline([scale_cached])
    baseline, _ = run(pipeline, [1, 2], factor=2.0)
    treatment, ctx = run(pipeline, [1, 2], factor=3.0)
    assert baseline == [2.0, 4.0]
    assert treatment == [3.0, 6.0]
    assert ctx.metrics["total"] == (9.0,)
    assert CALLS["scale"] == 2
    again, ctx = run(pipeline, [1, 2], factor=3.0)
    assert again == [3.0, 6.0] and ctx.provenance[0].cache == "hit"
    assert CALLS["scale"] == 2


def test_injected_default_and_ctx_value_equal_to_it_share_the_entry():
    pipeline = Pipeline([scale_cached])
    run(pipeline, [1])
    _, ctx = run(pipeline, [1], factor=1.0)
    assert ctx.provenance[0].cache == "hit"


def test_changed_value_read_with_ctx_get_misses_and_both_variants_are_kept(cache_dir):
    pipeline = Pipeline([normalize_cached])
    outs = [run(pipeline, [4.0], scale_factor=s) for s in (1.0, 2.0, 1.0, 2.0, 4.0)]
    assert [out for out, _ in outs] == [[4.0], [2.0], [4.0], [2.0], [1.0]]
    assert [ctx.provenance[0].cache for _, ctx in outs] == ["miss", "miss", "hit", "hit", "miss"]
    assert CALLS["normalize"] == 3
    assert len(entry_files(cache_dir)) == 3


def test_a_read_key_appearing_later_misses():
    pipeline = Pipeline([normalize_cached])
    assert run(pipeline, [4.0])[0] == [4.0]  # scale_factor absent: the default 1.0
    assert run(pipeline, [4.0], scale_factor=4.0)[0] == [1.0]
    assert CALLS["normalize"] == 2


def test_values_the_step_did_not_read_do_not_cause_misses():
    pipeline = Pipeline([normalize_cached])
    run(pipeline, [4.0], scale_factor=2.0, replicate=0)
    _, ctx = run(pipeline, [4.0], scale_factor=2.0, replicate=1, other="x")
    assert ctx.provenance[0].cache == "hit"
    assert CALLS["normalize"] == 1


def test_reading_the_whole_context_with_as_dict_is_tracked():
    @pipeline_step(cacheable=True)
    def from_view(data, ctx):
        CALLS.bump("view")
        return data * ctx.as_dict().get("scale", 1)

    pipeline = Pipeline([from_view])
    out, ctx = run(pipeline, 10, scale=2)
    assert out == 20
    assert set(ctx.provenance[0].reads) == {"scale", ("crystallize", "keys")}
    assert run(pipeline, 10, scale=3)[0] == 30
    assert run(pipeline, 10, scale=2)[0] == 20
    assert CALLS["view"] == 2


def test_listing_the_context_keys_is_tracked():
    @pipeline_step(cacheable=True)
    def has_flag(data, ctx):
        CALLS.bump("keys")
        return data + ("flag" in ctx.keys()) + 10 * len(ctx) + 100 * ("other" in list(ctx))

    pipeline = Pipeline([has_flag])
    assert run(pipeline, 0)[0] == 0
    assert run(pipeline, 0, flag=None)[0] == 11
    assert run(pipeline, 0, flag=None, other=None)[0] == 121
    assert run(pipeline, 0)[0] == 0
    assert CALLS["keys"] == 3


def test_reading_earlier_metrics_is_tracked():
    @pipeline_step()
    def maybe_record(data, ctx):
        if ctx.get("emit"):
            ctx.metrics.add("early", 1)
        return data

    @pipeline_step(cacheable=True)
    def count_metrics(data, ctx):
        CALLS.bump("metrics")
        return data + len(ctx.metrics) + sum(sum(v) for v in ctx.metrics.as_dict().values())

    pipeline = Pipeline([maybe_record, count_metrics])
    assert run(pipeline, 10, emit=False)[0] == 10
    assert run(pipeline, 10, emit=True)[0] == 12
    assert run(pipeline, 10, emit=False)[0] == 10
    assert CALLS["metrics"] == 2


def test_a_read_value_is_recorded_as_the_step_found_it_not_after_it_changed_it():
    import random

    @pipeline_step(cacheable=True)
    def draw(data, ctx):
        CALLS.bump("draw")
        rng = ctx.get("generator")  # a mutable object: drawing changes its state
        return data + rng.random()

    pipeline = Pipeline([draw])
    first = run(pipeline, 0, generator=random.Random(7))[0]
    second = run(pipeline, 0, generator=random.Random(7))[0]  # same state when read: a hit
    other = run(pipeline, 0, generator=random.Random(8))[0]  # another state: a miss
    assert first == second != other
    assert CALLS["draw"] == 2


def test_a_step_reading_back_what_it_added_still_hits():
    @pipeline_step(cacheable=True)
    def self_reader(data, ctx):
        CALLS.bump("self")
        ctx.add("note", "made here")
        ctx.metrics.add("mine", 1)
        seen = (ctx["note"], ctx.metrics["mine"], tuple(ctx.keys()))
        return data, {"seen_keys": len(seen[2])}

    pipeline = Pipeline([self_reader])
    first = run(pipeline, 1)[1]
    second = run(pipeline, 1)[1]
    assert CALLS["self"] == 1, "a step that reads its own additions never hit"
    assert [r.cache for r in second.provenance] == ["hit"]
    assert second["note"] == "made here" and second.metrics["mine"] == (1,)
    assert first.metrics["seen_keys"] == second.metrics["seen_keys"]


def test_steps_from_one_factory_with_different_captured_values_do_not_share_entries():
    def make_multiplier(k):
        @pipeline_step(cacheable=True)
        def multiply(data):
            CALLS.bump("multiply")
            return data * k

        return multiply

    assert Pipeline([make_multiplier(2)]).run(10) == 20
    assert Pipeline([make_multiplier(3)]).run(10) == 30
    assert Pipeline([make_multiplier(2)]).run(10) == 20
    assert CALLS["multiply"] == 2


def _versioned(variant, version):
    # Two definitions with the same qualified name, as an edit of one file would give.
    if variant == 1:

        @pipeline_step(cacheable=True, version=version)
        def versioned(data):
            CALLS.bump("versioned")
            return data + 1

    else:

        @pipeline_step(cacheable=True, version=version)
        def versioned(data):
            CALLS.bump("versioned")
            return data + 1000

    return versioned


def test_edited_code_without_version_misses():
    assert Pipeline([_versioned(1, None)]).run(0) == 1
    assert Pipeline([_versioned(2, None)]).run(0) == 1000
    assert CALLS["versioned"] == 2


def test_version_replaces_the_code_part_of_the_key():
    assert Pipeline([_versioned(1, "v1")]).run(0) == 1
    # The code changed but the label did not: the user said outputs are still valid.
    assert Pipeline([_versioned(2, "v1")]).run(0) == 1
    assert CALLS["versioned"] == 1
    assert Pipeline([_versioned(2, "v2")]).run(0) == 1000
    assert CALLS["versioned"] == 2


class CachedOffset(PipelineStep):
    cacheable = True

    def __init__(self, offset):
        self.offset = offset
        self.calls = 0

    def __call__(self, data, ctx):
        self.calls += 1
        ctx.metrics.add("offset_used", self.offset)
        return data + self.offset

    @property
    def params(self):
        return {"offset": self.offset}


def test_class_based_cacheable_step_keys_on_params():
    first, second, other = CachedOffset(1), CachedOffset(1), CachedOffset(2)
    assert run(Pipeline([first]), 10)[0] == 11
    out, ctx = run(Pipeline([second]), 10)
    assert out == 11 and ctx.metrics["offset_used"] == (1,)
    assert run(Pipeline([other]), 10)[0] == 12
    assert (first.calls, second.calls, other.calls) == (1, 0, 1)


def test_async_cacheable_step_hits_in_run_and_arun():
    @pipeline_step(cacheable=True)
    async def fetch(data, *, suffix="!"):
        CALLS.bump("fetch")
        await asyncio.sleep(0)
        return data + suffix

    assert Pipeline([fetch]).run("a") == "a!"
    ctx = FrozenContext()
    assert asyncio.run(Pipeline([fetch]).arun("a", ctx)) == "a!"
    assert ctx.provenance[0].cache == "hit"
    assert CALLS["fetch"] == 1


def test_numpy_input_and_output_are_cached():
    @pipeline_step(cacheable=True)
    def centre(data):
        CALLS.bump("centre")
        return data - data.mean()

    data = np.arange(1000.0)
    first = Pipeline([centre]).run(data)
    second = Pipeline([centre]).run(np.arange(1000.0))
    np.testing.assert_array_equal(first, second)
    assert CALLS["centre"] == 1
    Pipeline([centre]).run(np.arange(1000.0).astype(np.float32))
    assert CALLS["centre"] == 2


# -- where entries live ---------------------------------------------------------------


def test_entry_lives_at_step_hash_slash_input_hash(cache_dir):
    _, ctx = run(Pipeline([scale_cached(factor=2.0)]), [1, 2])
    record = ctx.provenance[0]
    assert entry_files(cache_dir) == [cache_dir / record.step_hash / f"{record.input_hash}.pkl"]


def test_default_cache_dir_is_dot_cache_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CRYSTALLIZE_CACHE_DIR")
    _, ctx = run(Pipeline([scale_cached]), [1])
    record = ctx.provenance[0]
    assert (tmp_path / ".cache" / record.step_hash / f"{record.input_hash}.pkl").is_file()


def test_an_explicit_store_is_used(tmp_path, cache_dir):
    store = LocalCacheStore(tmp_path / "elsewhere")
    Pipeline([scale_cached]).run([1], cache=store)
    ctx = FrozenContext()
    Pipeline([scale_cached]).run([1], ctx, cache=store)
    assert ctx.provenance[0].cache == "hit"
    assert len(entry_files(tmp_path / "elsewhere")) == 1
    assert entry_files(cache_dir) == []


def test_cache_false_disables_caching(cache_dir):
    pipeline = Pipeline([scale_cached])
    for _ in range(2):
        ctx = FrozenContext()
        pipeline.run([1], ctx, cache=False)
        assert ctx.provenance[0].cache == "off"
        assert ctx.provenance[0].step_hash is None
    assert CALLS["scale"] == 2
    assert not cache_dir.exists()


# -- damaged entries ------------------------------------------------------------------


def _damage_and_recover(cache_dir, damage, caplog):
    pipeline = Pipeline([scale_cached(factor=0.5)])
    data = list(range(2000))
    expected, _ = run(pipeline, data)
    (path,) = entry_files(cache_dir)
    damage(path)

    with caplog.at_level(logging.WARNING, logger="crystallize"):
        out, ctx = run(pipeline, data)
    assert out == expected
    assert ctx.provenance[0].cache == "miss"
    assert CALLS["scale"] == 2
    assert "damaged" in caplog.text

    assert entry_files(cache_dir) == [path]  # rewritten in place
    out, ctx = run(pipeline, data)
    assert out == expected and ctx.provenance[0].cache == "hit"
    assert ctx.metrics["total"] == (sum(expected),)
    assert CALLS["scale"] == 2


def test_truncated_entry_is_a_miss_and_is_rewritten(cache_dir, caplog):
    def truncate(path):
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])

    _damage_and_recover(cache_dir, truncate, caplog)


def test_entry_with_flipped_bytes_is_a_miss_and_is_rewritten(cache_dir, caplog):
    def flip(path):
        blob = bytearray(path.read_bytes())
        middle = len(blob) // 2
        for i in range(middle, middle + 4):
            blob[i] ^= 0xFF
        path.write_bytes(bytes(blob))

    _damage_and_recover(cache_dir, flip, caplog)


def test_a_bit_flip_that_still_unpickles_is_caught_by_the_checksum(cache_dir, caplog):
    # Flip one bit inside one float of the stored output: the pickle still loads,
    # with a slightly different number, so only the checksum can notice.
    def flip_a_float(path):
        blob = bytearray(path.read_bytes())
        at = blob.find(struct.pack(">d", 999.5))  # 0.5 * 1999, the last output value
        assert at > 0
        blob[at + 7] ^= 0x01
        path.write_bytes(bytes(blob))

    _damage_and_recover(cache_dir, flip_a_float, caplog)


def test_empty_or_foreign_entry_is_a_miss_and_is_rewritten(cache_dir, caplog):
    _damage_and_recover(cache_dir, lambda path: path.write_bytes(b""), caplog)
    CALLS.counts.clear()
    for path in entry_files(cache_dir):
        path.unlink()
    _damage_and_recover(cache_dir, lambda path: path.write_bytes(b"not an entry" * 100), caplog)


# -- what cannot be cached ------------------------------------------------------------


@pipeline_step(cacheable=True)
def locky(data):
    CALLS.bump("locky")
    return {"lock": threading.Lock(), "value": data}


def test_unpicklable_output_is_logged_and_not_cached(cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        out, ctx = run(Pipeline([locky]), 5)
    assert out["value"] == 5
    assert ctx.provenance[0].cache == "skipped"
    assert "could not be pickled" in caplog.text
    assert "'locky'" in caplog.text
    assert entry_files(cache_dir) == []
    out, _ = run(Pipeline([locky]), 5)
    assert out["value"] == 5
    assert CALLS["locky"] == 2


class PickleTrap:
    """Data that counts, and refuses, every attempt to pickle it."""

    def __init__(self) -> None:
        self.attempts = 0

    def __reduce_ex__(self, protocol):
        self.attempts += 1
        raise RuntimeError("PickleTrap must not be pickled")

    def __getstate__(self):
        self.attempts += 1
        raise RuntimeError("PickleTrap must not be pickled")


@pipeline_step()
def consume(data):
    CALLS.bump("consume")
    return [1, 2, 3]


def test_non_cacheable_steps_never_hash_or_pickle_their_input(cache_dir):
    trap = PickleTrap()
    ctx = FrozenContext()
    assert Pipeline([consume]).run(trap, ctx) == [1, 2, 3]
    assert trap.attempts == 0
    assert ctx.provenance[0].cache == "off"
    assert not cache_dir.exists()

    # Followed by a cacheable step, the trap is still never touched.
    assert Pipeline([consume, scale_cached]).run(trap) == [1.0, 2.0, 3.0]
    assert trap.attempts == 0
    assert len(entry_files(cache_dir)) == 1


@pipeline_step(cacheable=True)
def size(data):
    CALLS.bump("size")
    return len(data)


def test_unhashable_input_runs_without_the_cache(cache_dir, caplog):
    trap = PickleTrap()
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        out, ctx = run(Pipeline([size]), [trap])
    assert trap.attempts > 0  # the trap works: a cacheable step does try to hash it
    assert out == 1
    assert CALLS["size"] == 1
    assert ctx.provenance[0].cache == "skipped"
    assert "could not be hashed" in caplog.text
    assert entry_files(cache_dir) == []


# -- code edits, seen by a fresh process ----------------------------------------------

MODULE = """\
import os

from crystallize import pipeline_step

SCALE = {scale}


def helper(x):
    return {helper}


def unrelated():
    return {unrelated}


@pipeline_step(cacheable=True{version})
def compute(data):
    with open(os.environ["COUNTER_FILE"], "a") as fh:
        fh.write("call\\n")
    return {body}
"""

DRIVER = """\
import json
import sys

sys.path.insert(0, sys.argv[1])
import stepmod
from crystallize import FrozenContext, Pipeline

ctx = FrozenContext()
out = Pipeline([stepmod.compute()]).run([1, 2, 3], ctx)
print(json.dumps({"out": out, "cache": ctx.provenance[0].cache}))
"""


class Project:
    """A step module on disk, edited between runs of a fresh interpreter."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.src.mkdir()
        self.counter = root / "calls.txt"
        self.driver = root / "driver.py"
        self.driver.write_text(DRIVER)
        self.env = dict(
            os.environ,
            CRYSTALLIZE_CACHE_DIR=str(root / "cache"),
            COUNTER_FILE=str(self.counter),
            # An edit within the same second must not be served a stale .pyc.
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.fields = dict(scale="2", helper="x * SCALE", unrelated="1", body="[helper(x) for x in data]", version="")

    def write(self, **changes: str) -> None:
        self.fields.update(changes)
        (self.src / "stepmod.py").write_text(MODULE.format(**self.fields))

    def run(self) -> tuple[list, str]:
        done = subprocess.run(
            [sys.executable, str(self.driver), str(self.src)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["out"], result["cache"]

    @property
    def calls(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0


def test_edits_to_the_step_its_helper_or_a_constant_miss_in_a_new_process(tmp_path):
    project = Project(tmp_path)
    project.write()
    assert project.run() == ([2, 4, 6], "miss")
    assert project.run() == ([2, 4, 6], "hit")
    assert project.calls == 1

    project.write(helper="x * SCALE + 1")  # a helper the step calls
    assert project.run() == ([3, 5, 7], "miss")
    assert project.run() == ([3, 5, 7], "hit")
    assert project.calls == 2

    project.write(scale="3")  # a module constant the helper uses
    assert project.run() == ([4, 7, 10], "miss")
    assert project.calls == 3

    project.write(body="[helper(x) for x in reversed(data)]")  # the step itself
    assert project.run() == ([10, 7, 4], "miss")
    assert project.calls == 4

    project.write(unrelated="2")  # code the step never reaches
    assert project.run() == ([10, 7, 4], "hit")

    # Back to the first version of everything: its entry is still there.
    project.write(scale="2", helper="x * SCALE", body="[helper(x) for x in data]")
    assert project.run() == ([2, 4, 6], "hit")
    assert project.calls == 4


def test_version_label_keeps_entries_across_code_edits_in_a_new_process(tmp_path):
    project = Project(tmp_path)
    project.write(version=', version="1"')
    assert project.run() == ([2, 4, 6], "miss")
    project.write(helper="x * SCALE + 1", body="[helper(x) for x in reversed(data)]")
    assert project.run() == ([2, 4, 6], "hit")  # the label says the old outputs still hold
    assert project.calls == 1
    project.write(version=', version="2"')
    assert project.run() == ([7, 5, 3], "miss")
    assert project.calls == 2
