"""Signed cache entries: forged files are never unpickled; where the key comes from.

Forgeries are real files in the real cache directory whose body, if unpickled, would
create a marker file. The key file is made in a ``XDG_CONFIG_HOME`` under
``tmp_path``; processes with different keys are real subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crystallize import Experiment, LocalCacheStore, pipeline_step
from crystallize.backend import resolve_cache, serialize_experiment
from crystallize.cache import MAGIC, CorruptEntryError, decode_entry
from crystallize.signing import (
    KEY_ENV,
    MAC_SIZE,
    cache_key,
    key_from_text,
    key_path,
    sign,
    verify,
)
from crystallize.stores import KeyedStore

REPLICATES = 5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_key(tmp_path, monkeypatch):
    """This test's own key file (under tmp_path) and cache directory; no key variable."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("CRYSTALLIZE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "config" / "crystallize" / "cache.key"


@pipeline_step(cacheable=True)
def square(data):
    squared = [x * x for x in data]
    return squared, {"total": sum(squared)}


def experiment(**kwargs) -> Experiment:
    return Experiment(lambda ctx: [1, 2, 3], [square()], replicates=REPLICATES, **kwargs)


def entry_file(cache_dir: Path, result) -> Path:
    """The file of the entry ``square`` stored in the first run of ``result``."""
    record = result.runs[0].provenance[0]
    return LocalCacheStore(cache_dir).path(record.step_hash, record.input_hash)


def decode_file(path: Path, key: bytes):
    """The entry in ``path``, verified: its MAC binds the slot it is stored in."""
    return decode_entry(path.read_bytes(), key, where=f"{path.parent.name}/{path.stem}")


class CreatesAFile:
    """Unpickling this opens (creates) ``marker`` for writing: code runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    body = pickle.dumps({"output": CreatesAFile(marker)}, protocol=5)
    # The test can fail: this body really does run code when unpickled.
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps({"output": CreatesAFile(probe)}, protocol=5)).get("output").close()
    assert probe.exists()
    probe.unlink()
    return body


FORGERIES = {
    "zero-mac": lambda body: MAGIC + bytes(MAC_SIZE) + body,
    "no-mac": lambda body: MAGIC + body,
    "mac-under-another-key": lambda body: MAGIC + sign(body, key_from_text("someone else's key")) + body,
}


@pytest.mark.parametrize("forge", list(FORGERIES.values()), ids=list(FORGERIES))
def test_a_forged_entry_is_never_unpickled_and_is_rewritten(forge, tmp_path, caplog):
    path = entry_file(tmp_path / "cache", experiment().run(replicates=1))
    marker = tmp_path / "pwned"
    path.write_bytes(forge(payload(marker)))

    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = experiment().run()

    assert not marker.exists()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"total": [14] * REPLICATES}
    assert [r.provenance[0].cache for r in result.runs] == ["miss"] + ["hit"] * (REPLICATES - 1)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(path) in warning and "does not verify" in warning
    # Rewritten in place, signed with this user's key.
    assert entry_file(tmp_path / "cache", result) == path
    assert decode_file(path, cache_key()).output == [1, 4, 9]


def test_an_entry_of_an_older_format_is_a_quiet_miss_and_is_rewritten(tmp_path, caplog):
    path = entry_file(tmp_path / "cache", experiment().run(replicates=1))
    blob = path.read_bytes()
    path.write_bytes(b"CRYSTALLIZE-ENTRY\x01" + bytes(16) + blob[len(MAGIC) + MAC_SIZE :])
    with caplog.at_level(logging.INFO, logger="crystallize"):
        result = experiment().run()
    assert result.runs[0].provenance[0].cache == "miss"
    # An upgrade is not damage: said once, at INFO, naming both formats.
    said = [r for r in caplog.records if "another version of crystallize" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "format 1" in said[0].getMessage() and f"format {MAGIC[-1]}" in said[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert decode_file(path, cache_key()).output == [1, 4, 9]


def test_a_frame_that_is_no_entry_at_all_is_damaged(tmp_path, caplog):
    path = entry_file(tmp_path / "cache", experiment().run(replicates=1))
    path.write_bytes(b"PK\x03\x04 not an entry")
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = experiment().run()
    assert result.runs[0].provenance[0].cache == "miss"
    assert "damaged (bad header)" in caplog.text


def test_decode_rejects_a_body_signed_with_another_key():
    blob = MAGIC + sign(b"body", key_from_text("a")) + b"body"
    with pytest.raises(CorruptEntryError, match="does not verify"):
        decode_entry(blob, key_from_text("b"))


# -- where the key comes from --------------------------------------------------------


def test_the_key_file_is_made_0600_in_the_config_dir_outside_the_cache(isolated_key, tmp_path):
    assert not isolated_key.exists()
    result = experiment().run()
    assert key_path() == isolated_key
    assert isolated_key.stat().st_mode & 0o777 == 0o600
    assert len(isolated_key.read_text().strip()) == 64
    assert not list((tmp_path / "cache").rglob("cache.key"))
    assert [p.name for p in isolated_key.parent.iterdir()] == ["cache.key"]  # no temp files left
    path = entry_file(tmp_path / "cache", result)
    assert decode_file(path, key_from_text(isolated_key.read_text().strip())).output == [1, 4, 9]


def test_without_xdg_config_home_the_key_lives_in_dot_config(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache_key()
    assert (tmp_path / "home" / ".config" / "crystallize" / "cache.key").stat().st_mode & 0o777 == 0o600


def test_the_environment_key_overrides_the_file(isolated_key, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "shared by the whole cluster")
    result = experiment().run()
    assert not isolated_key.exists()
    path = entry_file(tmp_path / "cache", result)
    assert decode_file(path, key_from_text("shared by the whole cluster")).output == [1, 4, 9]
    with pytest.raises(CorruptEntryError):
        decode_file(path, key_from_text("another"))


def test_the_file_text_works_as_the_environment_key(isolated_key, monkeypatch):
    file_key = cache_key()
    monkeypatch.setenv(KEY_ENV, isolated_key.read_text().strip())
    assert cache_key() == file_key


def test_an_existing_key_file_is_used_as_it_is(isolated_key):
    isolated_key.parent.mkdir(parents=True)
    isolated_key.write_text("my own secret\n")
    isolated_key.chmod(0o600)
    assert cache_key() == key_from_text("my own secret")


def test_a_key_file_others_can_read_is_warned_about(isolated_key, caplog):
    isolated_key.parent.mkdir(parents=True)
    isolated_key.write_text("my own secret\n")
    isolated_key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        cache_key()
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text


def test_no_key_means_no_cache_one_warning_and_correct_runs(tmp_path, monkeypatch, caplog):
    config = tmp_path / "config-is-a-file"
    config.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        first = experiment().run()
        second = experiment().run()
    for result in (first, second):
        assert result.errors == []
        assert result.metrics.baseline.metrics == {"total": [14] * REPLICATES}
        assert {r.provenance[0].cache for r in result.runs} == {"error"}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(config) in warning and KEY_ENV in warning
    assert not (tmp_path / "cache").exists()


def test_sign_and_verify():
    key = key_from_text("k")
    mac = sign(b"body", key)
    assert len(mac) == MAC_SIZE
    assert verify(mac, b"body", key)
    assert not verify(mac, b"body!", key)
    assert not verify(mac, b"body", key_from_text("K"))


# -- processes with their own keys ---------------------------------------------------

STEP_MODULE = """\
from crystallize import pipeline_step


@pipeline_step(cacheable=True)
def cube(data):
    return [x ** 3 for x in data]
"""

RUN_ONCE = """\
import json, sys
sys.path.insert(0, sys.argv[1])
from crystallize import FrozenContext, Pipeline
import signed_steps
ctx = FrozenContext()
out = Pipeline([signed_steps.cube()]).run([1, 2, 3], ctx)
print(json.dumps({"cache": ctx.provenance[0].cache, "out": out}))
"""


def run_process(tmp_path: Path, **env: str) -> dict:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_ONCE, str(tmp_path / "mods")],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_entry_written_under_key_a_is_a_miss_under_key_b(tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "signed_steps.py").write_text(STEP_MODULE)
    statuses = [run_process(tmp_path, **{KEY_ENV: key}) for key in ("key A", "key A", "key B", "key B", "key A")]
    assert [s["cache"] for s in statuses] == ["miss", "hit", "miss", "hit", "miss"]
    assert all(s["out"] == [1, 8, 27] for s in statuses)


RACE = """\
import os, sys, time
from pathlib import Path
from crystallize.signing import cache_key
gate = Path(sys.argv[1])
Path(sys.argv[2], str(os.getpid())).touch()
while not gate.exists():
    time.sleep(0.001)
print(cache_key().hex())
"""


def test_racing_processes_agree_on_one_new_key(isolated_key, tmp_path):
    ready, gate = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(gate), str(ready)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.touch()
    keys = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert keys == {key_from_text(isolated_key.read_text().strip()).hex()}
    assert [p.name for p in isolated_key.parent.iterdir()] == ["cache.key"]


# -- the driver's key travels with the shipped experiment ----------------------------

WORKER = """\
import sys
from pathlib import Path
from crystallize.backend import deserialize_experiment, steps_set_up
job = deserialize_experiment(Path(sys.argv[1]).read_bytes())
with steps_set_up(job) as host:
    for replicate in range(3):
        run = host.run(replicate, "baseline")
        print(run.provenance[0].cache, run.metrics["total"][0])
record = run.provenance[0]
print(getattr(job.cache, "store", job.cache).path(record.step_hash, record.input_hash))
"""


def ship(job, path: Path) -> Path:
    path.write_bytes(serialize_experiment(job, backend="test"))
    return path


def run_worker(job: Path, config: Path) -> list[str]:
    """Run a shipped job as on another node: no key variable, its own key file.

    Returns ``[status, total] * 3 + [entry file]``.
    """
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env.update(PYTHONPATH=str(ROOT), XDG_CONFIG_HOME=str(config))
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(job)], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return proc.stdout.split()


def test_workers_with_other_key_files_use_the_drivers_key(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "the driver's key")
    exp = experiment(cache=LocalCacheStore(tmp_path / "shared-cache"))
    job = resolve_cache(exp)
    assert isinstance(job.cache, KeyedStore) and job.cache.key == key_from_text("the driver's key")
    assert "driver" not in repr(job.cache) and exp.cache is not job.cache
    keyed = ship(job, tmp_path / "keyed.pkl")

    *statuses, entry_name = run_worker(keyed, tmp_path / "node-1")
    assert statuses == ["miss", "14", "hit", "14", "hit", "14"]
    # Another node, another key file: it verifies node 1's entry with the driver's key.
    assert run_worker(keyed, tmp_path / "node-2")[:-1] == ["hit", "14", "hit", "14", "hit", "14"]
    entry = Path(entry_name)
    assert decode_file(entry, key_from_text("the driver's key")).output == [1, 4, 9]

    # Shipped without the driver's key, a third node cannot verify the entry: a miss,
    # and the entry is rewritten under that node's own key.
    unkeyed = ship(exp, tmp_path / "unkeyed.pkl")
    assert run_worker(unkeyed, tmp_path / "node-3")[:-1] == ["miss", "14", "hit", "14", "hit", "14"]
    node_3_key = key_from_text((tmp_path / "node-3" / "crystallize" / "cache.key").read_text().strip())
    assert decode_file(entry, node_3_key).output == [1, 4, 9]


def test_resolve_cache_leaves_an_uncached_experiment_without_a_key(isolated_key):
    job = resolve_cache(experiment(cache=False))
    assert job.cache is False
    assert not isolated_key.exists()


@pytest.mark.ray
def test_ray_workers_sign_with_the_drivers_key(ray_session, tmp_path, monkeypatch):
    from crystallize_ray import RayExecution

    # Set after Ray started, so only the driver has this key; workers would use
    # their own per-user key file if the driver's key did not travel.
    monkeypatch.setenv(KEY_ENV, "only the driver knows")
    result = experiment(plugins=[RayExecution()]).run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"total": [14] * REPLICATES}
    entry = entry_file(tmp_path / "cache", result)
    assert decode_file(entry, key_from_text("only the driver knows")).output == [1, 4, 9]
