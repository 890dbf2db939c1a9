"""Artifacts: written inside steps, saved by the driver under a versioned tree, on every
backend; unsafe names refused; cached steps replay theirs."""

from __future__ import annotations

import asyncio
import doctest
import logging
import os

import pytest

from crystallize import (
    Artifact,
    ArtifactError,
    ArtifactPlugin,
    ArtifactRecord,
    AsyncExecution,
    Experiment,
    LocalCacheStore,
    ParallelExecution,
    Pipeline,
    SerialExecution,
    Treatment,
    pipeline_step,
)
from crystallize import artifacts as artifacts_module
from crystallize.artifacts import path_part


@pipeline_step()
def write_report(data, ctx):
    Artifact("sub/x.txt").write(f"{ctx['condition']}:{ctx['replicate']}:{os.getpid()}")
    Artifact("raw.bin").write(bytes([ctx["replicate"], 255]))
    return data


@pipeline_step(cacheable=True)
def expensive_plot(data, ctx, *, calls_file: str):
    with open(calls_file, "a") as fh:
        fh.write("called\n")
    Artifact("plot.txt").write(f"plot of {data}")
    return data


@pipeline_step()
async def async_write(data, ctx):
    await asyncio.sleep(0.01 * (5 - ctx["replicate"]))  # finish in reverse order
    Artifact("mine.txt").write(f"replicate {ctx['replicate']}")
    return data


@pipeline_step()
def write_bad_type(data, ctx):
    Artifact("x.json").write({"not": "bytes"})
    return data


BACKENDS = {
    "serial": lambda: SerialExecution(),
    "thread": lambda: ParallelExecution(max_workers=2, executor_type="thread"),
    "process": lambda: ParallelExecution(max_workers=2, executor_type="process"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_artifacts_land_under_versioned_tree(tmp_path, backend):
    plugin = ArtifactPlugin(root_dir=tmp_path / "arts")
    exp = Experiment(
        lambda ctx: [1],
        Pipeline([write_report()]),
        plugins=[plugin, BACKENDS[backend]()],
        treatments=[Treatment("treat", {"k": 1})],
        replicates=2,
        name="artsy",
    )
    result = exp.run()
    assert result.errors == []
    v0 = tmp_path / "arts" / "artsy" / "v0"
    assert plugin.run_dir == v0
    for condition in ("baseline", "treat"):
        for r in range(2):
            folder = v0 / condition / f"replicate_{r}"
            text = (folder / "sub" / "x.txt").read_text()
            assert text.startswith(f"{condition}:{r}:")
            assert (folder / "raw.bin").read_bytes() == bytes([r, 255])
    files = sorted(p.relative_to(v0).as_posix() for p in v0.rglob("*") if p.is_file())
    assert len(files) == 8
    if backend == "process":
        pids = {
            (v0 / c / f"replicate_{r}" / "sub" / "x.txt").read_text().rsplit(":", 1)[1]
            for c in ("baseline", "treat")
            for r in range(2)
        }
        assert str(os.getpid()) not in pids  # written in workers, saved by the driver
    assert result.artifacts[0][2] == ArtifactRecord("sub/x.txt", result.run(0).artifacts[0].data)
    assert len(result.artifacts) == 8


def test_second_run_goes_to_v1(tmp_path):
    exp = Experiment(
        lambda ctx: [1], Pipeline([write_report()]), plugins=[ArtifactPlugin(root_dir=tmp_path / "arts")], name="again"
    )
    exp.run()
    exp.run()
    base = tmp_path / "arts" / "again"
    assert sorted(p.name for p in base.iterdir()) == ["v0", "v1"]
    assert (base / "v1" / "baseline" / "replicate_0" / "sub" / "x.txt").is_file()
    assert (base / "v0" / "baseline" / "replicate_0" / "sub" / "x.txt").is_file()


def test_default_root_is_artifacts_in_cwd(tmp_path):
    Experiment(lambda ctx: [1], Pipeline([write_report()]), plugins=[ArtifactPlugin()], name="here").run()
    assert (tmp_path / "artifacts" / "here" / "v0" / "baseline" / "replicate_0" / "sub" / "x.txt").is_file()


def test_unversioned_plugin_writes_in_place(tmp_path):
    exp = Experiment(
        lambda ctx: [1],
        Pipeline([write_report()]),
        plugins=[ArtifactPlugin(root_dir=tmp_path / "arts", versioned=False)],
        name="flat",
    )
    exp.run()
    exp.run()
    base = tmp_path / "arts" / "flat"
    assert sorted(p.name for p in base.iterdir()) == ["baseline"]


@pytest.mark.parametrize(
    "name", ["../escape.txt", "sub/../../escape.txt", "/etc/passwd", "/tmp/x.txt", "..\\escape.txt", "C:/evil.txt"]
)
def test_unsafe_artifact_names_refused(name):
    with pytest.raises(ArtifactError, match=r"would escape the artifact root.*relative path without '\.\.'"):
        Artifact(name)


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_artifact_names_refused(name):
    with pytest.raises(ArtifactError, match="non-empty string"):
        Artifact(name)


@pytest.mark.parametrize("name", ["plots//loss.csv", "plots/./loss.csv", "./loss.csv", "plots/", "."])
def test_empty_or_dot_parts_refused(name):
    with pytest.raises(ArtifactError, match=r"has an empty or '\.' part.*such as 'plots/loss.csv'"):
        Artifact(name)


def test_nul_in_artifact_name_refused():
    with pytest.raises(ArtifactError, match="contains a NUL character; remove it"):
        Artifact("plots/lo\0ss.csv")


def test_empty_path_part_refused():
    with pytest.raises(ArtifactError, match="must be a non-empty string, got ''"):
        path_part("")


def test_unsafe_name_inside_a_step_is_a_run_error(tmp_path):
    @pipeline_step()
    def escape(data, ctx):
        Artifact("../escape.txt").write("x")
        return data

    result = Experiment(
        lambda ctx: [1], Pipeline([escape()]), plugins=[ArtifactPlugin(root_dir=tmp_path / "arts")], name="esc"
    ).run()
    assert [(e.step, e.type) for e in result.errors] == [("escape", "ArtifactError")]
    assert not (tmp_path / "arts" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_write_outside_a_step_refused():
    with pytest.raises(ArtifactError, match="outside a running step"):
        Artifact("a.txt").write("x")


def test_write_of_unsupported_type_is_a_run_error():
    result = Experiment(lambda ctx: [1], Pipeline([write_bad_type()])).run()
    assert [(e.step, e.type) for e in result.errors] == [("write_bad_type", "ArtifactError")]
    assert "takes bytes or str, got dict" in result.errors[0].message


def test_cached_step_artifact_replayed_on_hit(tmp_path):
    calls = tmp_path / "calls.txt"
    plugin = ArtifactPlugin(root_dir=tmp_path / "arts")
    exp = Experiment(
        lambda ctx: [1, 2],
        Pipeline([expensive_plot(calls_file=str(calls))]),
        plugins=[plugin],
        name="cached",
        cache=LocalCacheStore(tmp_path / "cache"),
    )
    first = exp.run()
    assert calls.read_text().count("called") == 1
    second = exp.run()
    assert calls.read_text().count("called") == 1  # served from the cache
    assert second.run(0).provenance[0].cache == "hit"
    assert first.run(0).provenance[0].cache == "miss"
    for version in ("v0", "v1"):
        target = tmp_path / "arts" / "cached" / version / "baseline" / "replicate_0" / "plot.txt"
        assert target.read_text() == "plot of [1, 2]"
    assert second.run(0).artifacts == first.run(0).artifacts


def test_cached_step_artifact_replayed_under_process_backend(tmp_path):
    calls = tmp_path / "calls.txt"
    exp = Experiment(
        lambda ctx: [3],
        Pipeline([expensive_plot(calls_file=str(calls))]),
        plugins=[ArtifactPlugin(root_dir=tmp_path / "arts"), ParallelExecution(max_workers=2, executor_type="process")],
        name="pcached",
        cache=LocalCacheStore(tmp_path / "cache"),
    )
    exp.run()
    exp.run()
    assert calls.read_text().count("called") == 1
    target = tmp_path / "arts" / "pcached" / "v1" / "baseline" / "replicate_0" / "plot.txt"
    assert target.read_text() == "plot of [3]"


def test_concurrent_async_runs_keep_their_own_artifacts(tmp_path):
    exp = Experiment(
        lambda ctx: [1],
        Pipeline([async_write()]),
        replicates=5,
        name="concurrent",
        plugins=[AsyncExecution(), ArtifactPlugin(root_dir=tmp_path / "arts")],
    )
    result = exp.run()
    assert result.errors == []
    for r in range(5):
        path = tmp_path / "arts" / "concurrent" / "v0" / "baseline" / f"replicate_{r}" / "mine.txt"
        assert path.read_text() == f"replicate {r}"
        assert [a.name for a in result.run(r).artifacts] == ["mine.txt"]


@pipeline_step()
def measure_and_write(data, ctx):
    ctx.metrics.add("score", ctx["replicate"] + 0.5)
    Artifact("sub/x.txt").write("sub")
    Artifact("raw.bin").write(b"raw")
    Artifact("plots/loss.csv").write("loss")
    return data


def _run(tmp_path, name="guarded", backend=None, **kwargs):
    plugins = [ArtifactPlugin(root_dir=tmp_path / "arts", versioned=False), backend or SerialExecution()]
    exp = Experiment(lambda ctx: [1], Pipeline([measure_and_write()]), plugins=plugins, name=name, **kwargs)
    return exp.run()


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_path_part_is_readable_and_keeps_any_script():
    assert [path_part(n) for n in ["lr=0.1", "lr/0.1", "lr 0.1", "温度", "湿度", "50%", "a~b", ".", ".."]] == [
        "lr%3D0.1",
        "lr%2F0.1",
        "lr%200.1",
        "温度",
        "湿度",
        "50%25",
        "a%7Eb",
        "%2E",
        "%2E%2E",
    ]
    assert path_part("run-1_final.v2") == "run-1_final.v2"
    assert path_part("a\0b") == "a%00b"


def test_path_part_is_injective_where_escaping_alone_would_not_be():
    names = ["lr=0.1", "lr%3D0.1", "lr%253D0.1", "lr_0.1", ".", "%2E", "..", "...", "a b", "a_b", "a%20b"]
    assert len({path_part(n) for n in names}) == len(names)


def test_docstring_examples_run():
    failed, attempted = doctest.testmod(artifacts_module)
    assert attempted >= 3 and failed == 0


def test_colliding_condition_names_land_in_distinct_readable_folders(tmp_path):
    names = ["lr=0.1", "lr/0.1", "lr 0.1", "温度", "湿度"]
    result = _run(tmp_path, name="exp/β 1", treatments=[Treatment(n, {"k": i}) for i, n in enumerate(names)])
    assert result.errors == []
    base = tmp_path / "arts" / "exp%2Fβ%201"
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["baseline", "lr%3D0.1", "lr%2F0.1", "lr%200.1", "温度", "湿度"]
    )
    for name in names:
        assert (base / path_part(name) / "replicate_0" / "plots" / "loss.csv").read_text() == "loss"
    assert _files(tmp_path / "arts") == sorted(
        f"exp%2Fβ%201/{c}/replicate_0/{f}"
        for c in ["baseline", *map(path_part, names)]
        for f in ["sub/x.txt", "raw.bin", "plots/loss.csv"]
    )


def test_dot_condition_names_stay_inside_their_own_folders(tmp_path):
    result = _run(tmp_path, treatments=[Treatment(".", {}), Treatment("..", {})])
    assert result.errors == [] and all(r.artifact_errors == [] for r in result.runs)
    base = tmp_path / "arts" / "guarded"
    assert sorted(p.name for p in base.iterdir()) == ["%2E", "%2E%2E", "baseline"]
    assert [p.name for p in (tmp_path / "arts").iterdir()] == ["guarded"]
    assert (base / "%2E%2E" / "replicate_0" / "raw.bin").read_bytes() == b"raw"


def test_case_only_differences_are_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        _run(tmp_path, treatments=[Treatment("Fast", {}), Treatment("fast", {})])
    assert "Conditions 'Fast' and 'fast' differ only in case" in caplog.text


def test_over_long_names_keep_a_readable_prefix_a_hash_and_the_extension(tmp_path):
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    part = path_part(long_a)
    assert len(part.encode()) <= 255 and part.startswith("x" * 200) and "~" in part
    assert part != path_part(long_b)
    # golden: folder names of long conditions must not move between versions
    assert path_part("x" * 300) == "x" * 238 + "~125237ea2ad7bc7a"
    wide = path_part("温" * 100 + ".csv")  # 304 bytes: cut at a whole character
    assert wide.endswith(".csv") and wide.startswith("温" * 70) and len(wide.encode()) <= 255
    escaped = path_part("=" * 100)  # cut at a whole %3D escape
    assert escaped.split("~")[0] == "%3D" * (len(escaped.split("~")[0]) // 3)

    @pipeline_step()
    def long_file(data, ctx):
        Artifact("plots/" + "loss" * 80 + ".csv").write("long")
        return data

    plugin = ArtifactPlugin(root_dir=tmp_path / "arts", versioned=False)
    result = Experiment(
        lambda ctx: [1],
        Pipeline([long_file()]),
        plugins=[plugin],
        name="long",
        treatments=[Treatment(long_a, {}), Treatment(long_b, {})],
    ).run()
    assert result.errors == [] and all(r.artifact_errors == [] for r in result.runs)
    for condition in (long_a, long_b):
        target = plugin.path_for(0, condition, "plots/" + "loss" * 80 + ".csv")
        assert target.read_text() == "long" and target.name.endswith(".csv")
    assert len(list((tmp_path / "arts" / "long").iterdir())) == 3


def test_symlinked_folder_inside_the_root_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    replicate = tmp_path / "arts" / "guarded" / "baseline" / "replicate_0"
    replicate.mkdir(parents=True)
    (replicate / "sub").symlink_to(outside, target_is_directory=True)
    (replicate / "plots").symlink_to(outside, target_is_directory=True)
    result = _run(tmp_path)
    assert list(outside.iterdir()) == []
    run = result.run(0)
    assert len(run.artifact_errors) == 2
    assert run.artifact_errors[0].startswith("replicate 0, condition 'baseline': artifact 'sub/x.txt'")
    assert "is a symbolic link; crystallize follows no link below the artifact root" in run.artifact_errors[0]
    assert "Remove the link" in run.artifact_errors[0]
    assert (replicate / "raw.bin").read_bytes() == b"raw"
    assert result.metrics.baseline.metrics == {"score": [0.5]}


def test_symlink_in_place_of_the_file_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    replicate = tmp_path / "arts" / "guarded" / "baseline" / "replicate_0"
    replicate.mkdir(parents=True)
    (replicate / "raw.bin").symlink_to(victim)
    result = _run(tmp_path)
    assert result.run(0).artifact_errors == []
    assert victim.read_bytes() == b"keep me"
    assert not (replicate / "raw.bin").is_symlink() and (replicate / "raw.bin").read_bytes() == b"raw"


def test_symlinked_experiment_folder_is_refused_before_any_run(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "arts").mkdir()
    (tmp_path / "arts" / "guarded").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match=r"guarded' is a symbolic link.*make its target the root_dir"):
        _run(tmp_path)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_failed_writes_are_recorded_on_the_run_and_the_others_still_land(tmp_path, caplog, backend):
    replicate = tmp_path / "arts" / "guarded" / "baseline" / "replicate_0"
    (replicate / "raw.bin").mkdir(parents=True)  # a folder where the file goes
    (replicate / "sub").write_text("a file where a folder goes")
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = _run(tmp_path, replicates=2, backend=BACKENDS[backend]())
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"score": [0.5, 1.5]}
    errors = result.run(0).artifact_errors
    assert len(errors) == 2
    assert errors[0].startswith("replicate 0, condition 'baseline': artifact 'sub/x.txt' could not be written")
    assert "is a file where a folder is needed; move it away" in errors[0]
    assert errors[1].startswith("replicate 0, condition 'baseline': artifact 'raw.bin' could not be written")
    assert "IsADirectoryError" in errors[1] and "Remove what is in the way" in errors[1]
    assert (replicate / "plots" / "loss.csv").read_text() == "loss"
    assert result.run(1).artifact_errors == []
    assert _files(replicate.parent / "replicate_1") == ["plots/loss.csv", "raw.bin", "sub/x.txt"]
    assert caplog.text.count("Artifact not written") == 2
    lines = [line for line in result.summary().splitlines() if line.startswith("ARTIFACT NOT WRITTEN")]
    assert lines == [f"ARTIFACT NOT WRITTEN {e}" for e in errors]
    assert [p.name for p in replicate.iterdir() if p.name.endswith(".tmp")] == []
