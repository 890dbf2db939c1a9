"""The run journal: finished runs survive a dead driver, and a resume runs only what is missing.

In-process tests stop a run with Ctrl-C (a step raising KeyboardInterrupt) and count
executions with a counter file; the kill tests SIGKILL a real driver process
(tests/scripts/journal_driver.py) half-way, on the process pool and on Ray, and resume
it in a fresh one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from crystallize import (
    Experiment,
    ParallelExecution,
    Pipeline,
    SeedPlugin,
    Treatment,
    hypothesis,
    pipeline_step,
    verifier,
)
from crystallize.journal import COMMIT_SECONDS, fingerprint

ROOT = Path(__file__).parents[1]
DRIVER = Path(__file__).parent / "scripts" / "journal_driver.py"


@pipeline_step()
def counted(data, ctx, *, log: str, shift: float = 0.0):
    """Notes each execution in ``log``.

    The test's files steer it without changing its code or parameters (which would
    change the experiment): ``<log>.stop`` holding N raises Ctrl-C at replicate N;
    ``<log>.fail`` holding N fails replicate N.
    """
    if ctx["replicate"] == _number(log + ".stop") and ctx["condition"] == "baseline":
        raise KeyboardInterrupt
    with open(log, "a") as fh:
        fh.write(f"{ctx['replicate']} {ctx['condition']}\n")
    if ctx["replicate"] == _number(log + ".fail"):
        raise RuntimeError("flaky")
    return data, {"value": ctx["rng"].random() + shift}


def _number(path: str) -> int:
    try:
        with open(path) as fh:
            return int(fh.read())
    except OSError:
        return -1


@verifier
def gain(baseline, treatment):
    return {"gain": sum(treatment["value"]) - sum(baseline["value"])}


@hypothesis(verifier=gain(), metrics="value", name="gain")
def by_gain(result):
    return -result["gain"]


def _experiment(
    tmp_path: Path,
    seed: int | None = 7,
    *,
    stop_at: int | None = None,
    fail_at: int | None = None,
    journal: bool | Path | None = None,
    **params,
) -> Experiment:
    for name, value in (("stop", stop_at), ("fail", fail_at)):
        steer = tmp_path / f"log.txt.{name}"
        steer.write_text(str(value)) if value is not None else steer.unlink(missing_ok=True)
    return Experiment(
        _source,
        [counted(log=str(tmp_path / "log.txt"), **params)],
        plugins=[SeedPlugin(seed=seed)],
        treatments=[Treatment("t", {"shift": 1.0})],
        hypotheses=[by_gain],
        replicates=6,
        name="grid",
        journal=tmp_path / "journal" if journal is None else journal,
    )


def _source(ctx):
    return None


def _executions(tmp_path: Path) -> list[tuple[int, str]]:
    log = tmp_path / "log.txt"
    return [(int(r), c) for r, c in (line.split() for line in log.read_text().splitlines())] if log.exists() else []


def _same(a, b) -> None:
    assert a.metrics.baseline.metrics == b.metrics.baseline.metrics
    assert a.metrics.treatments["t"].metrics == b.metrics.treatments["t"].metrics
    assert [(r.replicate, r.condition, r.seed) for r in a.runs] == [(r.replicate, r.condition, r.seed) for r in b.runs]
    assert [(h.name, h.results, h.ranking) for h in a.metrics.hypotheses] == [
        (h.name, h.results, h.ranking) for h in b.metrics.hypotheses
    ]


def test_resume_after_ctrl_c_runs_only_the_missing_runs_and_equals_an_uninterrupted_run(tmp_path):
    with pytest.raises(KeyboardInterrupt) as info:
        _experiment(tmp_path, stop_at=3).run()
    first = _executions(tmp_path)
    assert len(info.value.partial_result.runs) == len(first) == 6  # replicates 0-2, both conditions
    result = _experiment(tmp_path).run(resume=True)
    second = _executions(tmp_path)[len(first) :]
    assert sorted(second) == [(r, c) for r in range(3, 6) for c in ("baseline", "t")]  # each once
    assert result.provenance["resumed"] == 6 and result.errors == []
    (tmp_path / "log.txt").unlink()
    _same(result, _experiment(tmp_path, journal=False).run())


def test_a_drawn_seed_is_reused_on_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _experiment(tmp_path, seed=None, stop_at=2).run()
    header = json.loads(next((tmp_path / "journal").glob("grid-*.jsonl")).read_text().splitlines()[0])
    result = _experiment(tmp_path, seed=None).run(resume=True)
    assert result.provenance["seed"] == header["seed"] is not None
    assert result.provenance["resumed"] == 4
    _same(result, _experiment(tmp_path, seed=header["seed"], journal=False).run())


def test_a_complete_journal_resumes_without_running_anything(tmp_path):
    first = _experiment(tmp_path).run()
    runs = len(_executions(tmp_path))
    again = _experiment(tmp_path).run(resume=True)
    assert len(_executions(tmp_path)) == runs == 12
    assert again.provenance["resumed"] == 12
    _same(first, again)


def test_resume_can_add_replicates_and_reevaluates_changed_hypotheses(tmp_path):
    _experiment(tmp_path).run(replicates=3)
    result = _experiment(tmp_path).run(replicates=5, resume=True, hypotheses=[])
    assert sorted(_executions(tmp_path)[6:]) == [(r, c) for r in (3, 4) for c in ("baseline", "t")]
    assert result.provenance["resumed"] == 6 and result.metrics.hypotheses == []


def test_a_changed_experiment_never_resumes_from_a_stale_journal(tmp_path):
    _experiment(tmp_path).run()
    changed = _experiment(tmp_path)
    changed.initial_ctx = {"threshold": 0.5}
    with pytest.warns(
        UserWarning,
        match=r"Experiment 'grid' changed since its journal .* was written "
        r"\(initial_ctx changed\), so its 12 journaled run\(s\) are not reused",
    ):
        result = changed.run(resume=True)
    assert result.provenance["resumed"] == 0 and len(_executions(tmp_path)) == 24
    # The stale journal was replaced, not kept beside the new one.
    assert len(list((tmp_path / "journal").glob("grid-*.jsonl"))) == 1


def test_a_changed_step_is_named_in_the_warning(tmp_path):
    _experiment(tmp_path).run()
    changed = _experiment(tmp_path)
    changed.pipeline = Pipeline([counted(log=str(tmp_path / "other-log.txt"))])  # another explicit parameter
    with pytest.warns(UserWarning, match=r"step 'counted' changed"):
        result = changed.run(resume=True)
    assert result.provenance["resumed"] == 0


def test_failed_runs_run_again_on_resume(tmp_path):
    assert len(_experiment(tmp_path, fail_at=2).run().errors) == 2
    # The flaky failure is gone, and the experiment is the same: its runs are resumed,
    # the failed ones retried.
    before = len(_executions(tmp_path))
    result = _experiment(tmp_path).run(resume=True)
    assert sorted(_executions(tmp_path)[before:]) == [(2, "baseline"), (2, "t")]
    assert result.provenance["resumed"] == 10 and result.errors == []


def test_a_torn_last_line_is_ignored_and_cut_and_a_damaged_line_reruns_its_run(tmp_path):
    _experiment(tmp_path).run()
    path = next((tmp_path / "journal").glob("grid-*.jsonl"))
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = '{"record": 1, "replicate": garbage\n'  # damaged in the middle
    lines[-1] = lines[-1][: len(lines[-1]) // 2]  # torn: the driver died mid-write
    path.write_text("".join(lines))
    before = len(_executions(tmp_path))
    result = _experiment(tmp_path).run(resume=True)
    assert len(_executions(tmp_path)) - before == 2 and result.provenance["resumed"] == 10
    text = path.read_text()
    assert text.endswith("\n")
    # The torn line is gone; the damaged one stays (skipped); the two runs are appended.
    assert len(text.splitlines()) == 13 - 1 + 2
    assert [json.loads(line)["replicate"] for line in text.splitlines()[-2:]] == [1, 5]


def test_journal_false_writes_nothing_and_crystallize_home_moves_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path)
    exp.journal = False
    assert exp.run().provenance["journal"] is None
    assert not (tmp_path / ".crystallize").exists()
    monkeypatch.setenv("CRYSTALLIZE_HOME", str(tmp_path / "home"))
    exp.journal = None
    where = Path(exp.run().provenance["journal"])
    assert where.parent == tmp_path / "home" / "journals" and where.is_file()


def test_an_invalid_journal_setting_is_a_validation_error(tmp_path):
    from crystallize import ValidationError

    exp = _experiment(tmp_path)
    exp.journal = 42
    with pytest.raises(ValidationError, match="journal must be a directory"):
        exp.run()


def test_the_fingerprint_ignores_replicates_and_hypotheses_but_not_seeds(tmp_path):
    base = fingerprint(_experiment(tmp_path))[0]
    more = _experiment(tmp_path)
    more.replicates, more.hypotheses = 50, []
    assert fingerprint(more)[0] == base
    assert fingerprint(_experiment(tmp_path, seed=8))[0] != base
    assert fingerprint(_experiment(tmp_path, seed=None))[0] not in (base, fingerprint(_experiment(tmp_path, seed=9))[0])


# ------------------------------------------------------------ journals that fail


UNWRITABLE = textwrap.dedent("""
    import logging, resource, signal, sys
    from crystallize import Experiment, pipeline_step
    logging.basicConfig(level=logging.WARNING)
    @pipeline_step()
    def one(data, ctx):
        return data, {"x": ctx["replicate"]}
    # The header fits; the first commit of records does not: writes fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1200, 1200))
    result = Experiment(lambda ctx: None, [one()], journal=sys.argv[1], name="full").run(replicates=400)
    print("RESULT", len(result.runs), len(result.errors), result.metrics.baseline.metrics["x"] == list(range(400)))
""")


def test_a_journal_that_cannot_be_written_warns_once_and_costs_no_run(tmp_path):
    script = tmp_path / "unwritable.py"
    script.write_text(UNWRITABLE)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "journal")], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "RESULT 400 0 True" in proc.stdout
    assert proc.stderr.count("cannot be used") == 1, proc.stderr
    assert "The runs go on without it" in proc.stderr


def test_a_journal_directory_that_cannot_be_made_costs_no_run(tmp_path, caplog):
    (tmp_path / "blocked").write_text("a file where the journal folder should be")
    exp = _experiment(tmp_path)
    exp.journal = tmp_path / "blocked" / "journal"
    result = exp.run()
    assert len(result.runs) == 12 and result.errors == []
    assert result.provenance["journal"] is not None  # named, though it could not be used
    assert sum("cannot be used" in r.getMessage() for r in caplog.records) == 1


def test_a_second_driver_of_the_same_experiment_keeps_no_journal(tmp_path, caplog):
    exp = _experiment(tmp_path)
    exp.run()
    path = next((tmp_path / "journal").glob("grid-*.jsonl"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(path)!r}, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        size = path.stat().st_size
        result = exp.run()
        assert result.errors == [] and len(result.runs) == 12
        assert path.stat().st_size == size  # the other driver's journal was left alone
        assert any("another process is writing" in r.getMessage() for r in caplog.records)
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------- kill -9, then resume


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _finished(out: Path) -> list[tuple[int, str, float]]:
    path = out / "finished.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            rows.append((int(parts[0]), parts[1], float(parts[3])))
    return rows


def _driver_module():
    spec = importlib.util.spec_from_file_location("journal_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["process", pytest.param("ray", marks=pytest.mark.ray)])
def test_kill_9_of_the_driver_then_resume_loses_at_most_the_last_second(tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    # A Ray driver starts its own local Ray; Ray 2.60 turns on token auth for clusters
    # it starts, which only adds setup here, so it is disabled (as in test_interrupt).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    args = [sys.executable, str(DRIVER), backend, str(tmp_path)]
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(_finished(tmp_path)) < 24:  # 60 runs of 0.1 s on two workers: kill at ~40 %
            assert proc.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver finished too few runs in time"
            time.sleep(0.01)
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    children = json.loads((tmp_path / "children.json").read_text())
    if backend == "process":  # orphaned workers notice the dead driver and exit by themselves
        deadline = time.monotonic() + 10
        while [p for p in children if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in children if _alive(p)] == []
    for pid in children:  # what a lost node would take with it: Ray's own processes
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    first = _finished(tmp_path)

    done = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    second = _finished(tmp_path)[len(first) :]

    every = sorted([r, c] for r in range(30) for c in ("baseline", "shifted"))
    assert report["runs"] == every and report["errors"] == []
    assert 0 < report["resumed"] < 60
    assert len(second) == 60 - report["resumed"]
    finished_first = {(r, c): t for r, c, t in first}
    again = [(r, c) for r, c, _ in second if (r, c) in finished_first]
    # A run done before the kill runs again only if its result was not committed yet:
    # it finished in the last commit interval (plus scheduling slack) before the kill,
    # or it was in flight when the driver died and finished in an orphaned worker.
    window = COMMIT_SECONDS + 1.0
    late = [
        (key, round(killed_at - finished_first[key], 2)) for key in again if finished_first[key] < killed_at - window
    ]
    assert late == [], f"runs journaled long before the kill ran again: {late}"
    assert len(again) <= 12, again
    # Every run not finished before the kill ran exactly once afterwards.
    assert sorted((r, c) for r, c, _ in second if (r, c) not in finished_first) == sorted(
        {(r, c) for r in range(30) for c in ("baseline", "shifted")} - set(finished_first)
    )
    assert len(set((r, c) for r, c, _ in second)) == len(second)

    # The resumed result equals an uninterrupted run with the journal's (drawn) seed.
    header = json.loads(Path(report["journal"]).read_text().splitlines()[0])
    assert report["seed"] == header["seed"] is not None
    reference = _driver_module().build(header["seed"], out="", sleep=0.0).run()
    assert report["metrics"] == {
        "baseline": reference.metrics.baseline.metrics,
        "shifted": reference.metrics.treatments["shifted"].metrics,
    }
    assert report["seeds"] == sorted([r.replicate, r.condition, r.seed] for r in reference.runs)
    assert report["hypothesis"] == reference.get_hypothesis("shift_helps").results


def test_a_process_pool_resume_reuses_the_journal_of_a_serial_run(tmp_path):
    # Where runs execute is not part of the fingerprint.
    with pytest.raises(KeyboardInterrupt):
        _experiment(tmp_path, stop_at=4).run()
    exp = _experiment(tmp_path)
    exp.plugins.append(ParallelExecution(max_workers=2, executor_type="process"))
    result = exp.run(resume=True)
    assert result.provenance["resumed"] == 8 and len(result.runs) == 12
