"""The journal's direct encoder writes exactly the text of the general record path.

``run_to_json(run)`` must equal ``json.dumps(run_to_record(run))`` (compact, no NaN)
for every run, whether it takes the direct path or falls back: real runs of real
experiments (params, treatments, seeds, the step cache, errors, artifacts) and
hand-made runs holding every kind of value the record format tags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest

from crystallize import (
    Artifact,
    ArtifactRecord,
    Experiment,
    Pipeline,
    RunError,
    RunResult,
    SeedPlugin,
    StepRecord,
    Treatment,
    data_source,
    pipeline_step,
)
from crystallize.record_json import run_to_json
from crystallize.records import run_from_record, run_to_record


def general(run: RunResult) -> str:
    return json.dumps(run_to_record(run), separators=(",", ":"), allow_nan=False)


def assert_same_text(runs: list[RunResult]) -> None:
    for run in runs:
        line = run_to_json(run)
        assert line == general(run), (run.replicate, run.condition)
        assert "\n" not in line


@data_source
def numbers(ctx):
    return [1.0, 2.0, 3.0]


@pipeline_step()
def scale(data, ctx, *, factor: float = 1.0, label: str = "x", flag: bool = False, count: int = 0):
    return [x * factor for x in data]


@pipeline_step()
def measure(data, ctx):
    ctx.metrics.add("total", sum(data))
    if ctx["replicate"] == 0:  # a value the direct path leaves to the general one
        ctx.metrics.add("total", float("nan"))
    return data, {"label": "naïve ✓", "pair": (1, 2), "nothing": None, "mean": sum(data) / len(data)}


@pipeline_step(cacheable=True)
def draw(data, ctx):
    return data, {"draw": ctx["rng"].random()}


@pipeline_step()
def write_artifact(data, ctx):
    Artifact("out.txt").write(b"bytes")
    return data


@pipeline_step()
def fail_odd(data, ctx):
    if ctx["replicate"] % 2:
        raise RuntimeError("odd replicate")
    return data


def test_real_runs_of_several_experiments_encode_as_the_general_path(tmp_path):
    treatments = [
        Treatment("double", {"factor": 2.0}),
        Treatment("zero", {"factor": 0.0}),
        Treatment("negative_zero", {"factor": -0.0}),
        Treatment("int_one", {"factor": 1}),
        Treatment("true", {"factor": True}),
        Treatment("labelled", {"label": "ünï", "count": 3, "flag": True}),
    ]
    experiments = [
        Experiment(numbers(), Pipeline([scale(), measure()]), treatments=treatments, replicates=3, journal=False),
        Experiment(
            numbers(),
            Pipeline([scale(factor=3.0), draw()]),
            plugins=[SeedPlugin(seed=7)],
            replicates=3,
            journal=False,
            cache=tmp_path / "cache",
        ),
        Experiment(numbers(), Pipeline([write_artifact(), fail_odd()]), replicates=4, journal=False),
    ]
    runs = [run for exp in experiments for _ in range(2) for run in exp.run().runs]
    assert len({run_to_json(run) for run in runs}) == len(runs)
    assert any(run.error for run in runs) and any(run.artifacts for run in runs)
    assert any(step.step_hash for run in runs for step in run.provenance)
    assert_same_text(runs)
    assert_same_text(pickle.loads(pickle.dumps(runs)))  # as they come back from worker processes
    by_condition = {run.condition: run_to_json(run) for run in runs}
    # Equal params of other types or signs stay apart, whatever was written before.
    assert '"params":{"factor":0.0,' in by_condition["zero"]
    assert '"params":{"factor":-0.0,' in by_condition["negative_zero"]
    assert '"params":{"factor":1,' in by_condition["int_one"]
    assert '"params":{"factor":true,' in by_condition["true"]


def step(**changes) -> StepRecord:
    return StepRecord(**{"name": "s", "index": 0, "seconds": 1.25e-05, **changes})


@pytest.mark.parametrize(
    "run",
    [
        RunResult(0, "baseline"),
        RunResult(1, "b", metrics={"x": [1, 2.5, True, None, "s", float("inf")]}, seed=12),
        RunResult(2, "b", metrics={"x": (1.0,), "y": [[1, 2], (3,), {"k": 1}, {"$k": 1}, {1: 2}]}),
        RunResult(3, "b", metrics={"x": [b"raw", 1 + 2j, {1, 2}, frozenset(), object]}),
        RunResult(4, "b", seconds=float("nan"), seed=True),
        RunResult(5, "b", provenance=[step(params={"a": [1, (2, 3)], "b": {"c": None}})]),
        RunResult(6, "b", provenance=[step(params={"$a": 1}), step(params={1: 1})]),
        RunResult(7, "b", provenance=[step(reads=("k", ("crystallize", "random", "numpy")), added=("z",))]),
        RunResult(8, "b", provenance=[step(step_hash="ab", input_hash="cd", cache="hit", miss_reason="input changed")]),
        RunResult(9, "b", provenance=[step(waited=0.5, served_by="actor=1"), step(seconds=float("inf"))]),
        RunResult(10, "b", provenance=[{"not": "a StepRecord"}, step()]),
        RunResult(11, "b", error=RunError(11, "b", "s", "ValueError", "bad", "tb"), attempts=3),
        RunResult(12, "b", artifacts=[ArtifactRecord("a.bin", b"\x00\x01")], artifact_errors=["disk full"]),
        RunResult(13, "b", provenance=[step(params={"f": 1.0}), step(params={"f": 1}), step(params={"f": True})]),
        RunResult(14, "b", provenance=[step(params={"f": 0.0}), step(params={"f": -0.0}), step(params={"f": 0})]),
        RunResult(15, "b", provenance=[step(waited=0.0), step(waited=-0.0)]),
        RunResult(16, "b", provenance=[step(index=1)]),
        RunResult(17, "b", provenance=[step(index=True)]),
    ],
    ids=lambda run: f"r{run.replicate}",
)
def test_every_kind_of_value_encodes_as_the_general_path(run):
    assert_same_text([run, run])  # twice: the second may take what the first remembered


def test_a_param_changed_in_place_is_written_as_it_is_now():
    shared = [1, 2]
    run = RunResult(0, "baseline", provenance=[step(params={"a": shared})])
    assert_same_text([run])
    shared.append(3)
    assert_same_text([run])
    assert '"params":{"a":[1,2,3]}' in run_to_json(run)


def test_numpy_values_encode_as_the_general_path():
    np = pytest.importorskip("numpy")
    run = RunResult(
        0,
        "baseline",
        metrics={"f": [np.float64(0.25), np.float32(0.5)], "i": [np.int64(3)], "a": [np.arange(3)]},
        provenance=[step(params={"lr": np.float64(0.1)})],
    )
    assert_same_text([run])


def test_a_value_json_cannot_hold_raises_as_the_general_path():
    run = RunResult(0, "baseline", provenance=[step(waited=math.nan)])
    with pytest.raises(ValueError):
        general(run)
    with pytest.raises(ValueError):
        run_to_json(run)


def test_a_step_record_is_a_frozen_dataclass_with_every_field_in_order():
    record = StepRecord("s", 0)
    assert list(vars(record)) == [f.name for f in dataclasses.fields(StepRecord)]
    assert record.params == {} and record.params is not StepRecord("s", 0).params
    assert dataclasses.replace(record, seconds=0.5) == StepRecord("s", 0, seconds=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.name = "t"  # type: ignore[misc]


def test_a_line_reads_back_as_the_run():
    run = RunResult(
        4,
        "double",
        metrics={"x": [0.1, 2]},
        seed=99,
        provenance=[step(params={"factor": 2.0}), step(name="t", index=1)],
        seconds=0.003,
    )
    assert run_from_record(json.loads(run_to_json(run))) == run
