"""Artifacts: written inside steps, saved by the driver under a versioned tree, on every
backend; unsafe names refused; cached steps replay theirs."""

from __future__ import annotations

import asyncio
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
    exp = Experiment(lambda ctx: [1], Pipeline([write_report()]), plugins=[plugin, BACKENDS[backend]()],
                     treatments=[Treatment("treat", {"k": 1})], replicates=2, name="artsy")
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
        pids = {(v0 / c / f"replicate_{r}" / "sub" / "x.txt").read_text().rsplit(":", 1)[1]
                for c in ("baseline", "treat") for r in range(2)}
        assert str(os.getpid()) not in pids  # written in workers, saved by the driver
    assert result.artifacts[0][2] == ArtifactRecord("sub/x.txt", result.run(0).artifacts[0].data)
    assert len(result.artifacts) == 8


def test_second_run_goes_to_v1(tmp_path):
    exp = Experiment(lambda ctx: [1], Pipeline([write_report()]),
                     plugins=[ArtifactPlugin(root_dir=tmp_path / "arts")], name="again")
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
    exp = Experiment(lambda ctx: [1], Pipeline([write_report()]),
                     plugins=[ArtifactPlugin(root_dir=tmp_path / "arts", versioned=False)], name="flat")
    exp.run()
    exp.run()
    base = tmp_path / "arts" / "flat"
    assert sorted(p.name for p in base.iterdir()) == ["baseline"]


@pytest.mark.parametrize("name", ["../escape.txt", "sub/../../escape.txt", "/etc/passwd", "/tmp/x.txt",
                                  "..\\escape.txt", "C:/evil.txt"])
def test_unsafe_artifact_names_refused(name):
    with pytest.raises(ArtifactError, match=r"would escape the artifact root.*relative path without '\.\.'"):
        Artifact(name)


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_artifact_names_refused(name):
    with pytest.raises(ArtifactError, match="non-empty string"):
        Artifact(name)


def test_unsafe_name_inside_a_step_is_a_run_error(tmp_path):
    @pipeline_step()
    def escape(data, ctx):
        Artifact("../escape.txt").write("x")
        return data

    result = Experiment(lambda ctx: [1], Pipeline([escape()]),
                        plugins=[ArtifactPlugin(root_dir=tmp_path / "arts")], name="esc").run()
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
    exp = Experiment(lambda ctx: [1, 2], Pipeline([expensive_plot(calls_file=str(calls))]),
                     plugins=[plugin], name="cached", cache=LocalCacheStore(tmp_path / "cache"))
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
    exp = Experiment(lambda ctx: [3], Pipeline([expensive_plot(calls_file=str(calls))]),
                     plugins=[ArtifactPlugin(root_dir=tmp_path / "arts"),
                              ParallelExecution(max_workers=2, executor_type="process")],
                     name="pcached", cache=LocalCacheStore(tmp_path / "cache"))
    exp.run()
    exp.run()
    assert calls.read_text().count("called") == 1
    target = tmp_path / "arts" / "pcached" / "v1" / "baseline" / "replicate_0" / "plot.txt"
    assert target.read_text() == "plot of [3]"


def test_concurrent_async_runs_keep_their_own_artifacts(tmp_path):
    exp = Experiment(lambda ctx: [1], Pipeline([async_write()]), replicates=5, name="concurrent",
                     plugins=[AsyncExecution(), ArtifactPlugin(root_dir=tmp_path / "arts")])
    result = exp.run()
    assert result.errors == []
    for r in range(5):
        path = tmp_path / "arts" / "concurrent" / "v0" / "baseline" / f"replicate_{r}" / "mine.txt"
        assert path.read_text() == f"replicate {r}"
        assert [a.name for a in result.run(r).artifacts] == ["mine.txt"]
