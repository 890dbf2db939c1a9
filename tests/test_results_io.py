"""Saved results: the record format, save/load round trips, the table file, atomic writes."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
import time

import pytest

from crystallize import (
    Artifact,
    Experiment,
    HypothesisResult,
    Result,
    RunError,
    RunResult,
    SeedPlugin,
    StepRecord,
    Treatment,
    hypothesis,
    pipeline_step,
    verifier,
)
from crystallize.records import (
    RecordError,
    decode_value,
    encode_value,
    hypothesis_from_record,
    hypothesis_to_record,
    run_from_record,
    run_to_record,
)

np = pytest.importorskip("numpy")


# ------------------------------------------------------------------ an experiment


@pipeline_step()
def measure(data, ctx, *, C=1.0):
    r = ctx["replicate"]
    ctx.metrics.add("score", np.float64(C * 10 + r))  # a numpy scalar
    ctx.metrics.add("count", np.int64(r))
    ctx.metrics.add("label", f"r{r}")  # not a number
    ctx.metrics.add("shape", (r, C))  # a tuple
    ctx.metrics.add("odd", float("nan") if r == 0 else math.inf)
    Artifact("notes/run.txt").write(f"replicate {r}, C={C}")
    return data


@pipeline_step()
def fail_at_two(data, ctx):
    if ctx["replicate"] == 2:
        raise RuntimeError("replicate two always fails")
    return data


@verifier
def mean_gain(baseline, treatment, *, metric="score"):
    b = sum(baseline[metric]) / len(baseline[metric])
    t = sum(treatment[metric]) / len(treatment[metric])
    return {"gain": t - b, "p_value": 1.0 / (1.0 + abs(t - b)), "significant": t > b}


def _experiment():
    return Experiment(
        lambda ctx: [1, 2],
        [measure(), fail_at_two()],
        plugins=[SeedPlugin(seed=7)],
        treatments=[Treatment("C=10", {"C": 10.0}), Treatment("C=0.1", {"C": 0.1})],
        hypotheses=[hypothesis(verifier=mean_gain(), metrics="score", name="gain")(lambda r: -r["gain"])],
        initial_ctx={"C": 1.0},
        replicates=3,
        name="io",
    )


def assert_same_result(a: Result, b: Result) -> None:
    """Every field of two results, compared one by one (NaN equals NaN)."""
    assert _canon([_run_fields(r) for r in a.runs]) == _canon([_run_fields(r) for r in b.runs])
    assert a.conditions == b.conditions
    assert _canon(a.provenance) == _canon(b.provenance)
    assert _canon(a.treatment_params) == _canon(b.treatment_params)
    assert _canon(a.metrics.baseline.metrics) == _canon(b.metrics.baseline.metrics)
    assert _canon({k: v.metrics for k, v in a.metrics.treatments.items()}) == _canon(
        {k: v.metrics for k, v in b.metrics.treatments.items()}
    )
    assert _canon([vars(h) for h in a.metrics.hypotheses]) == _canon([vars(h) for h in b.metrics.hypotheses])
    assert a.errors == b.errors
    assert a.summary() == b.summary()


def _run_fields(run: RunResult) -> dict:
    return {f: getattr(run, f) for f in run.__dataclass_fields__}


def _canon(value):
    """NaN != NaN; compare through a marker instead. Types are kept (tuples stay tuples)."""
    if isinstance(value, float) and math.isnan(value):
        return ("NaN",)
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_canon(v) for v in value)
    return value


# ------------------------------------------------------------------ round trips


def test_a_saved_result_loads_equal_in_every_field(tmp_path):
    result = _experiment().run()
    assert len(result.errors) == 3 and result.metrics.hypotheses  # the failures and verdicts travel too
    folder = result.save(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "runs.jsonl", "runs.parquet"]
    loaded = Result.load(folder)
    assert_same_result(result, loaded)
    # the details that matter most, spelled out
    err = loaded.run(2, "C=10").error
    assert err.type == "RuntimeError" and "replicate two always fails" in err.traceback
    assert loaded.run(1, "C=10").provenance == result.run(1, "C=10").provenance
    assert all(isinstance(s, StepRecord) for s in loaded.run(1, "C=10").provenance)
    assert loaded.run(1, "C=10").seed == result.run(1, "C=10").seed is not None
    assert loaded.run(0).artifacts[0].data == b"replicate 0, C=1.0"
    assert loaded.run(1).metrics["shape"] == [(1, 1.0)]
    assert type(loaded.run(1).metrics["score"][0]) is float  # numpy scalars come back as Python
    assert loaded.get_hypothesis("gain").ranking == ["C=10", "C=0.1"]
    assert loaded.provenance.get("git") == result.provenance.get("git")
    assert loaded.treatment_params == {"baseline": {"C": 1.0}, "C=10": {"C": 10.0}, "C=0.1": {"C": 0.1}}


def test_every_run_field_round_trips_including_odd_ones(tmp_path):
    runs = [
        RunResult(
            0,
            "baseline",
            {
                "x": [
                    1,
                    2.5,
                    None,
                    True,
                    b"\x00\xff",
                    {"k": (1, 2)},
                    {3: "int key"},
                    {"$ref": "a dollar key"},
                    {1, 2},
                    frozenset({"a"}),
                    1 + 2j,
                    -math.inf,
                    10**30,
                ]
            },
            seed=12,
            seconds=0.125,
            attempts=3,
            provenance=[
                StepRecord(
                    "s",
                    0,
                    {"lr": 0.1, "layers": (64, 32)},
                    "ab" * 16,
                    "cd" * 16,
                    "miss",
                    ("lr", "seed"),
                    ("norm",),
                    0.5,
                ),
                "a note",
            ],
            artifact_errors=["replicate 0, condition 'baseline': artifact 'a' could not be written"],
        ),
        RunResult(0, "t", error=RunError(0, "t", "worker", "WorkerCrashedError", "died", "Traceback ...")),
    ]
    hyp = HypothesisResult(
        "h", ["x"], results={"t": {"p_value": math.nan}}, errors={"t2": "boom"}, ranking=["t"], scores={"t": math.inf}
    )
    result = Result(
        runs,
        ["baseline", "t"],
        hypotheses=[hyp],
        provenance={"name": "odd", "when": (2024, 1)},
        treatment_params={"t": {"lr": None}},
    )
    loaded = Result.load(result.save(tmp_path / "odd", table="csv"))
    assert_same_result(result, loaded)
    assert loaded.run(0).metrics["x"][4] == b"\x00\xff"
    assert loaded.run(0).provenance[1] == "a note"
    assert (loaded.run(0).attempts, loaded.run(0).seconds) == (3, 0.125)


def test_run_records_are_strict_json_and_pin_the_format():
    run = RunResult(
        1,
        "lr=0.1",
        {"accuracy": [0.91]},
        seed=1234,
        seconds=0.5,
        provenance=[StepRecord("train", 0, {"lr": 0.1}, reads=("lr",), seconds=0.25)],
    )
    record = run_to_record(run)
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert {
        k: record[k]
        for k in (
            "record",
            "replicate",
            "condition",
            "seed",
            "seconds",
            "attempts",
            "metrics",
            "error",
            "artifacts",
            "artifact_errors",
        )
    } == {
        "record": 1,
        "replicate": 1,
        "condition": "lr=0.1",
        "seed": 1234,
        "seconds": 0.5,
        "attempts": 1,
        "metrics": {"accuracy": [0.91]},
        "error": None,
        "artifacts": [],
        "artifact_errors": [],
    }
    step = record["provenance"][0]
    assert (step["name"], step["params"], step["reads"], step["cache"]) == ("train", {"lr": 0.1}, ["lr"], "off")
    assert run_from_record(record) == run


def test_hypothesis_records_round_trip():
    h = HypothesisResult(
        "h",
        ["a", "b"],
        results={"t": {"p": 0.5, "ci": (0.1, 0.9)}},
        errors={"u": "failed"},
        ranking=["t"],
        scores={"t": -math.inf},
    )
    assert hypothesis_from_record(json.loads(json.dumps(hypothesis_to_record(h), allow_nan=False))) == h


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -7,
        10**40,
        0.1,
        "text",
        "$not-a-tag",
        [1, [2, [3]]],
        (1, (2,)),
        {"a": {"b": [1]}},
        {1: "a", (2, 3): "b"},
        {"$x": 1},
        {1, 2, 3},
        frozenset({"x"}),
        b"bytes",
        bytearray(b"ba"),
        3 - 4j,
        math.inf,
        -math.inf,
    ],
    ids=repr,
)
def test_the_value_codec_round_trips_through_strict_json(value):
    encoded = json.loads(json.dumps(encode_value(value), allow_nan=False))
    decoded = decode_value(encoded)
    expected = bytes(value) if isinstance(value, bytearray) else value
    assert decoded == expected and type(decoded) is type(expected)


def test_numpy_values_come_back_as_python_scalars_and_arrays():
    assert decode_value(encode_value(np.float32(0.5))) == 0.5
    assert type(decode_value(encode_value(np.int64(3)))) is int
    assert decode_value(encode_value(np.bool_(True))) is True
    assert math.isnan(decode_value(json.loads(json.dumps(encode_value(np.float64("nan")), allow_nan=False))))
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    back = decode_value(json.loads(json.dumps(encode_value(array))))
    assert back.dtype == np.int16 and back.shape == (2, 3) and (back == array).all()


class Model:
    def __repr__(self):
        return "Model(layers=3)"


def test_other_objects_are_stored_as_repr_and_named_in_a_warning(tmp_path, caplog):
    result = Result([RunResult(0, "baseline", {"model": [Model()], "ok": [1]})], ["baseline"])
    with caplog.at_level(logging.WARNING, logger="crystallize.saving"):
        folder = result.save(tmp_path / "repr")
    assert "metric 'model' of replicate 0, condition 'baseline'" in caplog.text
    assert "test_results_io.Model" in caplog.text and "loads back as a string" in caplog.text
    assert Result.load(folder).run(0).metrics == {"model": ["Model(layers=3)"], "ok": [1]}
    assert "pickle" not in (folder / "runs.jsonl").read_text()


# ------------------------------------------------------------------ the table file


def test_the_parquet_table_has_one_row_per_value_and_parameter_columns(tmp_path):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    result = _experiment().run()
    table = pandas.read_parquet(result.save(tmp_path / "t") / "runs.parquet")
    assert list(table.columns) == [
        "replicate",
        "condition",
        "seed",
        "metric",
        "index",
        "value",
        "value_text",
        "error",
        "C",
    ]
    assert len(table) == len(result.to_dataframe())
    scores = table[(table.metric == "score") & table.error.isna()]
    by_c = scores.groupby("C")["value"].mean().to_dict()
    assert by_c == {0.1: 1.5, 1.0: 10.5, 10.0: 100.5}  # replicates 0 and 1 of each condition
    labels = table[table.metric == "label"]
    assert labels.value.isna().all() and set(labels.value_text) == {"r0", "r1", "r2"}
    shapes = table[table.metric == "shape"]
    assert json.loads(shapes.value_text.iloc[0]) == {"$tuple": [0, 1.0]}
    assert str(table.seed.dtype) == "Int64" and str(table.value.dtype) == "float64"


def test_csv_table_holds_the_same_rows(tmp_path):
    pandas = pytest.importorskip("pandas")
    result = _experiment().run()
    parquet = pandas.read_parquet(result.save(tmp_path / "p", table="parquet") / "runs.parquet")
    csv = pandas.read_csv(result.save(tmp_path / "c", table="csv") / "runs.csv")
    assert list(csv.columns) == list(parquet.columns)
    assert csv["value"].equals(parquet["value"].astype("float64"))
    assert list(csv["C"]) == list(parquet["C"])


def test_without_pyarrow_the_table_is_csv_and_parquet_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of pyarrow now fails
    result = Result([RunResult(0, "baseline", {"x": [1.5]})], ["baseline"])
    folder = result.save(tmp_path / "auto")
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "runs.csv", "runs.jsonl"]
    assert json.loads((folder / "result.json").read_text())["table"] == "runs.csv"
    with pytest.raises(ImportError, match=r"pip install 'crystallize-lab\[parquet\]'"):
        result.save(tmp_path / "forced", table="parquet")
    assert not (tmp_path / "forced").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


# ------------------------------------------------------------------ atomic, checked


def test_a_failed_save_leaves_the_earlier_save_intact(tmp_path, monkeypatch):
    first = Result([RunResult(0, "baseline", {"x": [1]})], ["baseline"])
    folder = first.save(tmp_path / "r")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    second = Result([RunResult(0, "baseline", {"x": [2]})], ["baseline"])
    with pytest.raises(ImportError):
        second.save(folder, table="parquet")  # fails after runs.jsonl was written
    assert Result.load(folder).run(0).metrics == {"x": [1]}
    second.save(folder, table="csv")
    assert Result.load(folder).run(0).metrics == {"x": [2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_save_killed_part_way_never_leaves_a_result_that_loads(tmp_path):
    marker = tmp_path / "writing-table"
    script = textwrap.dedent(f"""
        import time, pathlib
        from crystallize import Result, RunResult
        marker = pathlib.Path({str(marker)!r})
        Result([RunResult(0, "baseline", {{"x": [1]}})], ["baseline"]).save({str(tmp_path / "r")!r})
        class Slow:
            calls = 0
            def __repr__(self):
                Slow.calls += 1
                if Slow.calls == 2:  # the first call encodes runs.jsonl, the second writes the table
                    marker.touch()
                    time.sleep(60)
                return "Slow()"
        Result([RunResult(0, "baseline", {{"x": [Slow()]}})], ["baseline"]).save({str(tmp_path / "r")!r}, table="csv")
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the saving process ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert Result.load(tmp_path / "r").run(0).metrics == {"x": [1]}  # the earlier save, whole
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".r.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "runs.jsonl").exists()
    with pytest.raises(RecordError, match="No saved result"):
        Result.load(leftovers[0])  # the half-written folder has no result.json


def test_load_refuses_damaged_or_missing_files_with_the_fix(tmp_path):
    result = Result([RunResult(r, "baseline", {"x": [r]}) for r in range(3)], ["baseline"])
    with pytest.raises(RecordError, match=r"No saved result in .*result\.json"):
        Result.load(tmp_path / "nothing")
    folder = result.save(tmp_path / "r")
    runs = folder / "runs.jsonl"
    runs.write_bytes(runs.read_bytes()[:-40])
    with pytest.raises(RecordError, match="changed or truncated after saving"):
        Result.load(folder)
    folder = result.save(tmp_path / "v")
    meta = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(RecordError, match="Upgrade crystallize"):
        Result.load(folder)
    with pytest.raises(RecordError, match="newer crystallize"):
        decode_value({"$future": 1})
    with pytest.raises(RecordError, match="format 7"):
        run_from_record({**run_to_record(result.runs[0]), "record": 7})


def test_save_refuses_a_folder_holding_other_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a saved result; nothing was replaced"):
        Result([RunResult(0, "baseline")], ["baseline"]).save(folder)
    assert (folder / "thesis.tex").read_text() == "precious"
    assert Result.load(Result([RunResult(0, "baseline")], ["baseline"]).save(tmp_path / "empty")).runs


def test_save_rejects_an_unknown_table_format(tmp_path):
    with pytest.raises(ValueError, match="table must be 'auto', 'parquet' or 'csv', got 'xlsx'"):
        Result([RunResult(0, "baseline")], ["baseline"]).save(tmp_path / "x", table="xlsx")
