"""A cache store that fails never costs a run: real broken cache directories, real runs.

Each case breaks a real ``LocalCacheStore`` on disk, then runs a real experiment
(replicates >= 5) through ``Experiment.run()``. Every run must succeed with the right
metrics, the cacheable step's provenance must say ``"error"``, and each problem
(store, operation, errno) must be logged exactly once, however many runs meet it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import pytest

from crystallize import Experiment, LocalCacheStore, ParallelExecution, pipeline_step
from crystallize.stores import GuardedStore

REPLICATES = 6


def _permissions_bind() -> bool:
    """Whether file modes stop this process (not so for root, unless it dropped
    CAP_DAC_OVERRIDE), probed on a real read-only directory."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o500)
        try:
            open(os.path.join(tmp, "probe"), "w").close()
        except PermissionError:
            return True
        finally:
            os.chmod(tmp, 0o700)
        return False


MODES_BIND = _permissions_bind()


@pipeline_step(cacheable=True)
def double(data):
    doubled = [x * 2 for x in data]
    return doubled, {"total": sum(doubled)}


@pipeline_step()
def note_replicate(data, ctx):
    ctx.metrics.add("replicate", ctx["replicate"])
    return data


def experiment(cache=None, backend=None) -> Experiment:
    return Experiment(
        lambda ctx: [1, 2, 3],
        [double(), note_replicate()],
        plugins=[backend] if backend else None,
        replicates=REPLICATES,
        cache=cache,
    )


BACKENDS = {
    "serial": lambda: None,
    "threads": lambda: ParallelExecution(max_workers=4, executor_type="thread"),
}


def store_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the cache steps aside" in r.getMessage()]


def problems(warnings: list[str]) -> list[str]:
    """``"<operation> <exception type>"`` of each store warning, sorted."""
    return sorted(" ".join(re.search(r"could not (\w+) entry .* \((\w+): ", w).groups()) for w in warnings)


def run_and_check(exp: Experiment, caplog, statuses=frozenset({"error"})):
    """Run; check every run succeeded with the right metrics; return the warnings."""
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = exp.run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {
        "total": [12] * REPLICATES,
        "replicate": list(range(REPLICATES)),
    }
    seen = {run.provenance[0].cache for run in result.runs}
    assert seen <= statuses, seen
    assert all(run.provenance[1].cache == "off" for run in result.runs)
    return store_warnings(caplog)


def entry_path(root: Path) -> Path:
    """Where ``double``'s entry lives in ``root``, found by storing it once."""
    result = experiment(cache=LocalCacheStore(root)).run(replicates=1)
    record = result.runs[0].provenance[0]
    entry = LocalCacheStore(root).path(record.step_hash, record.input_hash)
    assert entry.is_file()
    return entry


# -- stores that stay broken: every run records "error" --------------------------------


def cache_dir_is_a_file(tmp_path: Path, monkeypatch) -> tuple[None, list[str]]:
    path = tmp_path / "not-a-dir"
    path.write_text("I am a file")
    monkeypatch.setenv("CRYSTALLIZE_CACHE_DIR", str(path))
    return None, ["put NotADirectoryError"]


def step_folder_is_a_file(tmp_path: Path, monkeypatch) -> tuple[LocalCacheStore, list[str]]:
    # A path component below the root is a regular file: fails even for root.
    root = tmp_path / "cache"
    folder = entry_path(root).parent
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    folder.write_text("I am a file")
    return LocalCacheStore(root), ["put FileExistsError"]


def entry_is_a_directory(tmp_path: Path, monkeypatch) -> tuple[LocalCacheStore, list[str]]:
    root = tmp_path / "cache"
    entry = entry_path(root)
    entry.unlink()
    (entry / "inside").mkdir(parents=True)
    return LocalCacheStore(root), ["get IsADirectoryError", "put IsADirectoryError"]


def read_only_directory(tmp_path: Path, monkeypatch) -> tuple[LocalCacheStore, list[str]]:
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o500)
    return LocalCacheStore(root), ["put PermissionError"]


BROKEN = {
    "cache-dir-is-a-file": cache_dir_is_a_file,
    "step-folder-is-a-file": step_folder_is_a_file,
    "entry-is-a-directory": entry_is_a_directory,
    "read-only-directory": pytest.param(
        read_only_directory,
        marks=pytest.mark.skipif(not MODES_BIND, reason="file modes do not bind this user (root)"),
    ),
}


@pytest.mark.parametrize("backend", list(BACKENDS), ids=list(BACKENDS))
@pytest.mark.parametrize("break_store", list(BROKEN.values()), ids=list(BROKEN))
def test_every_run_succeeds_records_error_and_each_problem_is_warned_once(
    break_store, backend, tmp_path, monkeypatch, caplog
):
    cache, expected = break_store(tmp_path, monkeypatch)
    caplog.clear()
    warnings = run_and_check(experiment(cache, BACKENDS[backend]()), caplog)
    assert problems(warnings) == expected
    # A second run() in this process meets the same problems and says nothing new.
    caplog.clear()
    assert run_and_check(experiment(cache, BACKENDS[backend]()), caplog) == []


def test_a_warning_names_the_store_the_entry_and_the_fix(tmp_path, caplog):
    root = tmp_path / "cache"
    entry = entry_path(root)
    entry.unlink()
    entry.mkdir()
    (warning, _) = run_and_check(experiment(LocalCacheStore(root)), caplog)
    assert f"LocalCacheStore({str(root)!r})" in warning
    assert str(entry) in warning
    assert "CRYSTALLIZE_CACHE_DIR" in warning and "Experiment(cache=...)" in warning


def test_process_backend_runs_succeed_when_the_cache_dir_is_a_file(tmp_path, monkeypatch, caplog):
    # Worker processes log their own warning (once each); the driver sees the runs.
    cache_dir_is_a_file(tmp_path, monkeypatch)
    backend = ParallelExecution(max_workers=2, executor_type="process")
    run_and_check(experiment(None, backend), caplog)


# -- unreadable entries: a miss that heals when the run stores a fresh entry -------------


def entry_is_a_symlink_loop(entry: Path) -> None:
    # Unreadable even for root: opening it fails with ELOOP.
    entry.unlink()
    entry.symlink_to(entry.name)


def entry_is_mode_000(entry: Path) -> None:
    entry.chmod(0o000)


UNREADABLE = {
    "symlink-loop": entry_is_a_symlink_loop,
    "mode-000": pytest.param(
        entry_is_mode_000,
        marks=pytest.mark.skipif(not MODES_BIND, reason="file modes do not bind this user (root)"),
    ),
}


@pytest.mark.parametrize("backend", list(BACKENDS), ids=list(BACKENDS))
@pytest.mark.parametrize("damage", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_an_unreadable_entry_is_an_error_once_then_rewritten(damage, backend, tmp_path, caplog):
    root = tmp_path / "cache"
    entry = entry_path(root)
    damage(entry)
    caplog.clear()
    exp = experiment(LocalCacheStore(root), BACKENDS[backend]())
    warnings = run_and_check(exp, caplog, statuses=frozenset({"error", "hit"}))
    assert len(warnings) == 1 and problems(warnings)[0].startswith("get ")
    # The run that met the error stored a fresh, readable entry in its place.
    assert entry.is_file() and not entry.is_symlink()
    result = exp.run()
    assert {run.provenance[0].cache for run in result.runs} == {"hit"}


def test_serial_runs_after_the_unreadable_entry_hit_the_rewritten_one(tmp_path, caplog):
    root = tmp_path / "cache"
    entry = entry_path(root)
    entry_is_a_symlink_loop(entry)
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = experiment(LocalCacheStore(root)).run()
    assert [run.provenance[0].cache for run in result.runs] == ["error"] + ["hit"] * (REPLICATES - 1)


# -- the guard itself ----------------------------------------------------------------------


def test_guard_answers_like_an_empty_store_and_flags_the_failure(tmp_path, caplog):
    root = tmp_path / "cache"
    entry = root / "ns" / "key.pkl"
    entry.mkdir(parents=True)  # every operation on this entry fails
    store = GuardedStore(LocalCacheStore(root))
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        assert store.get("ns", "key") is None
        store.put("ns", "key", b"blob")
        store.delete("ns", "key")
        assert store.contains("ns", "key") is False  # a directory is no entry
    assert store.failed
    assert problems(store_warnings(caplog)) == [
        "delete IsADirectoryError",
        "get IsADirectoryError",
        "put IsADirectoryError",
    ]


def test_other_errors_are_not_swallowed(tmp_path):
    # Only OSError is the store's problem; anything else is a bug to see.
    class Buggy(LocalCacheStore):
        def get(self, namespace, key):
            raise KeyError(key)

    with pytest.raises(KeyError):
        GuardedStore(Buggy(tmp_path)).get("ns", "key")
