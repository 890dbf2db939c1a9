"""Results say where they came from: git, versions, packages, host, times, parameters."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import shutil
import socket
import subprocess
import sys
import textwrap
from datetime import datetime

import pytest

import crystallize
from crystallize import Experiment, Result, Treatment

USER_CODE = textwrap.dedent("""
    import json
    import numpy as np
    from crystallize import pipeline_step

    @pipeline_step()
    def measure(data, *, C=1.0, tag=None):
        return data, {"score": float(np.float64(C) * 2), "n": len(json.dumps(data))}

    def source(ctx):
        return [1, 2]
""")

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(folder, *args):
    return subprocess.run(
        ["git", "-C", str(folder), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _user_module(folder, name):
    """Write the user's experiment code to ``folder`` and import it from there."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(USER_CODE)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(module, **kwargs):
    return Experiment(module.source, [module.measure()], name="prov", **kwargs).run(replicates=2)


@pytest.fixture
def repo(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    _git(folder, "init", "-q")
    yield folder
    for name in [n for n in sys.modules if n.startswith("user_exp_")]:
        del sys.modules[name]


# ---------------------------------------------------------------------------- git


@needs_git
def test_a_clean_tree_gives_its_commit(repo):
    module = _user_module(repo / "src", "user_exp_clean")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "experiment")
    git = _run(module).provenance["git"]
    assert git == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False, "root": str(repo.resolve())}


@needs_git
def test_an_edited_tree_is_dirty(repo):
    module = _user_module(repo, "user_exp_dirty")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "experiment")
    (repo / "user_exp_dirty.py").write_text(USER_CODE + "\n# tuned by hand\n")
    git = _run(module).provenance["git"]
    assert git["commit"] == _git(repo, "rev-parse", "HEAD") and git["dirty"] is True
    assert "git " + git["commit"][:12] + " with uncommitted changes" in _run(module).summary()


@needs_git
def test_a_tree_without_commits_gives_no_git_facts(repo):
    module = _user_module(repo, "user_exp_nocommit")
    result = _run(module)
    assert "git" not in result.provenance and result.errors == []


def test_code_outside_git_or_without_git_still_runs(tmp_path, monkeypatch):
    module = _user_module(tmp_path / "plain", "user_exp_plain")
    assert "git" not in _run(module).provenance
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))  # no git to be found
    module = _user_module(tmp_path / "nogit", "user_exp_nogit")
    result = _run(module)
    assert "git" not in result.provenance and result.metrics.baseline.metrics["score"] == [2.0, 2.0]


# ---------------------------------------------------------------- the other facts


def test_versions_packages_host_and_times(tmp_path):
    module = _user_module(tmp_path / "facts", "user_exp_facts")
    prov = _run(module).provenance
    assert prov["versions"]["python"] == platform.python_version()
    assert prov["versions"]["crystallize"] == crystallize.__version__
    assert prov["versions"]["numpy"] == importlib.metadata.version("numpy")
    # the user's code imports numpy and json: numpy is an installed distribution, json is stdlib
    assert prov["packages"] == {"numpy": importlib.metadata.version("numpy")}
    assert prov["host"] == socket.gethostname()
    started = datetime.fromisoformat(prov["started"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(prov["ended"].replace("Z", "+00:00"))
    assert prov["started"].endswith("Z") and started <= ended
    assert started.utcoffset().total_seconds() == 0
    assert 0 <= prov["seconds"] <= (ended - started).total_seconds() + 0.01


def test_ray_version_is_read_without_importing_ray(tmp_path):
    pytest.importorskip("ray")  # installed, so its version is known; importing it is what we avoid
    code = textwrap.dedent("""
        import sys, json
        from crystallize import Experiment, pipeline_step
        @pipeline_step()
        def one(data):
            return data, {"x": 1}
        prov = Experiment(lambda ctx: 0, [one()]).run().provenance
        print(json.dumps({"ray_imported": "ray" in sys.modules, "ray": prov["versions"].get("ray")}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out == {"ray_imported": False, "ray": importlib.metadata.version("ray")}


def test_saved_results_carry_their_provenance(tmp_path):
    module = _user_module(tmp_path / "saved", "user_exp_saved")
    result = _run(module)
    loaded = Result.load(result.save(tmp_path / "out"))
    assert loaded.provenance == result.provenance
    assert {"host", "versions", "packages", "started", "ended"} <= set(loaded.provenance)


# ------------------------------------------------------- treatment parameter columns


def test_treatment_parameters_are_dataframe_columns(tmp_path):
    pytest.importorskip("pandas")
    module = _user_module(tmp_path / "params", "user_exp_params")
    exp = Experiment(
        module.source,
        [module.measure()],
        name="grid",
        initial_ctx={"C": 1.0},
        treatments=[
            Treatment("C=10", {"C": 10.0}),
            Treatment("tagged", {"tag": "x"}),
            Treatment("by-fn", lambda ctx: ctx.add("C", 5.0)),
        ],
    )
    result = exp.run(replicates=2)
    assert result.treatment_params == {
        "baseline": {"C": 1.0, "tag": None},
        "C=10": {"C": 10.0, "tag": None},
        "tagged": {"C": 1.0, "tag": "x"},
    }
    df = result.to_dataframe()
    assert list(df.columns)[-2:] == ["C", "tag"]
    score = df[df.metric == "score"]
    # "score against C" is one groupby; the function treatment's C is unknown, so it is left out
    assert score.groupby("C")["value"].mean().to_dict() == {1.0: 2.0, 10.0: 20.0}
    assert score[score.condition == "by-fn"]["C"].isna().all()
    assert set(score[score.condition == "tagged"]["tag"]) == {"x"}


def test_a_parameter_named_like_a_column_gets_a_prefix(tmp_path):
    pytest.importorskip("pandas")

    def source(ctx):
        return ctx.get("value", 0)

    from crystallize import pipeline_step

    @pipeline_step()
    def echo(data):
        return data, {"out": data}

    result = Experiment(source, [echo()], treatments=[Treatment("v3", {"value": 3})]).run()
    df = result.to_dataframe()
    assert list(df.columns)[-1] == "param_value"
    by_condition = df.set_index("condition")["param_value"]
    assert by_condition.isna()["baseline"] and by_condition["v3"] == 3
    assert df.set_index("condition")["value"].to_dict() == {"baseline": 0, "v3": 3}
