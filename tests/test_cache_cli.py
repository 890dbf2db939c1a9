"""``crystallize cache``: ls, du, verify, gc and clear on real caches (a directory, a bucket)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner

from crystallize import Experiment, LocalCacheStore, pipeline_step
from crystallize.cli import main
from crystallize.entries import BLOBS, open_manifest
from crystallize.signing import cache_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CRYSTALLIZE_CACHE_KEY", raising=False)
    monkeypatch.delenv("CRYSTALLIZE_CACHE_URL", raising=False)
    monkeypatch.delenv("CRYSTALLIZE_CACHE_DIR", raising=False)


@pipeline_step(cacheable=True)
def big(data, *, size=1):
    return bytes(100_000 * size), {"n": len(data)}  # in a blob


@pipeline_step(cacheable=True)
def small(data):
    return sum(data), {"s": sum(data)}  # inline


def fill(cache) -> None:
    """Entries of two steps: three of big (two sizes; two entries share an output blob) and
    two of small (one per output of big it was given)."""
    for size in (1, 2):
        Experiment(lambda ctx: [1, 2], [big(size=size), small()], replicates=2, cache=cache).run()
    Experiment(lambda ctx: [3], [big(size=1)], cache=cache).run()


def cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def as_json(*args: str) -> dict:
    return json.loads(cli(*args, "--json").output)


def test_ls_lists_entries_per_step_with_bytes_and_last_use(tmp_path):
    fill(tmp_path / "c")
    report = as_json("cache", "ls", "--cache", str(tmp_path / "c"))
    steps = {row["step"]: row for row in report["steps"]}
    assert steps["big"]["entries"] == 3 and steps["big"]["versions"] == 2
    assert steps["small"]["entries"] == 2
    # big's two inputs of size 1 share one blob: counted once.
    assert 300_000 < steps["big"]["bytes"] < 310_000
    assert time.time() - 60 < steps["big"]["last_use"] <= time.time()
    table = cli("cache", "ls", "--cache", str(tmp_path / "c")).output
    assert "big" in table and "small" in table and "last use" in table


def test_du_counts_kinds_and_unreferenced_blobs(tmp_path):
    fill(tmp_path / "c")
    store = LocalCacheStore(tmp_path / "c")
    store.put(BLOBS, "0" * 32, b"orphan")
    kinds = as_json("cache", "du", "--cache", str(tmp_path / "c"))["kinds"]
    assert kinds["manifests"]["count"] == 5 and kinds["blobs"]["count"] == 3  # 2 outputs, 1 orphan
    assert kinds["unreferenced blobs"] == {"count": 1, "bytes": 6}
    assert kinds["records"]["count"] >= 2  # the miss explanations of each step


def test_verify_finds_forged_manifests_and_damaged_blobs_and_repair_deletes_them(tmp_path):
    fill(tmp_path / "c")
    store = LocalCacheStore(tmp_path / "c")
    manifests = [o for o in store.walk() if o.namespace != BLOBS and o.key != "last" and "." not in o.key]
    blobbed = [
        o for o in manifests if open_manifest(store.get(o.namespace, o.key), cache_key(), f"{o.namespace}/{o.key}").blob
    ]
    inline = [o for o in manifests if o not in blobbed]
    victim = blobbed[0]
    blob = open_manifest(store.get(victim.namespace, victim.key), cache_key(), f"{victim.namespace}/{victim.key}").blob
    path = store.path(BLOBS, blob)
    path.write_bytes(path.read_bytes()[:-1] + b"!")  # one byte of the output changed
    forged = store.path(inline[0].namespace, inline[0].key)
    forged.write_bytes(forged.read_bytes()[:-1] + b"?")

    failed = cli("cache", "verify", "--cache", str(tmp_path / "c"), "--json", ok=False)
    assert failed.exit_code == 1
    bad = {item["object"]: item["problem"] for item in json.loads(failed.output)["bad"]}
    assert "does not verify" in bad[f"{inline[0].namespace}/{inline[0].key}"]
    assert any("does not match" in problem for problem in bad.values())
    sharing = sum(
        1
        for o in blobbed
        if open_manifest(store.get(o.namespace, o.key), cache_key(), f"{o.namespace}/{o.key}").blob == blob
    )
    assert len(bad) == 1 + sharing

    repaired = as_json("cache", "verify", "--cache", str(tmp_path / "c"), "--repair")
    assert len(repaired["bad"]) == len(bad) and not path.exists() and not forged.exists()
    assert as_json("cache", "verify", "--cache", str(tmp_path / "c"))["bad"] == []


def test_gc_drops_entries_unused_for_long_then_the_least_recently_used(tmp_path):
    fill(tmp_path / "c")
    store = LocalCacheStore(tmp_path / "c")
    key = cache_key()
    week = time.time() - 8 * 86400
    aged = 0
    for obj in list(store.walk()):
        if obj.namespace == BLOBS:
            continue
        where = f"{obj.namespace}/{obj.key}"
        manifest = open_manifest(store.get(obj.namespace, obj.key), key, where)
        if manifest.header["step"] == "small":  # last used a week ago
            store.put(obj.namespace, obj.key, manifest.touched(key, where, now=week))
            aged += 1
    dry = as_json("cache", "gc", "--cache", str(tmp_path / "c"), "--older-than", "7d", "--dry-run")
    assert dry["deleted_entries"] == aged == 2 and dry["dry_run"]
    done = as_json("cache", "gc", "--cache", str(tmp_path / "c"), "--older-than", "7d")
    assert done["deleted_entries"] == 2
    steps = {r["step"]: r for r in as_json("cache", "ls", "--cache", str(tmp_path / "c"))["steps"]}
    assert set(steps) == {"big"}

    limit = 250_000  # room for one of big's blobs of 100 kB, not for the 200 kB one too
    done = as_json("cache", "gc", "--cache", str(tmp_path / "c"), "--max-size", str(limit))
    assert done["deleted_entries"] == 2  # the two oldest: only then is a blob freed
    kinds = as_json("cache", "du", "--cache", str(tmp_path / "c"))["kinds"]
    assert kinds["manifests"]["bytes"] + kinds["blobs"]["bytes"] <= limit
    assert kinds["unreferenced blobs"]["count"] == 0
    # What is left still hits.
    result = Experiment(lambda ctx: [3], [big(size=1)], cache=tmp_path / "c").run()
    assert result.runs[0].provenance[0].cache == "hit"


def test_clear_deletes_everything(tmp_path):
    fill(tmp_path / "c")
    assert "deleted" in cli("cache", "clear", "--cache", str(tmp_path / "c"), "--yes").output
    assert list((tmp_path / "c").iterdir()) == []
    refused = CliRunner().invoke(main, ["cache", "clear", "--cache", str(tmp_path / "c")], input="n\n")
    assert refused.exit_code == 1


def test_the_commands_work_on_a_bucket(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/cli"
    fill(url)
    assert {r["step"] for r in as_json("cache", "ls", "--cache", url)["steps"]} == {"big", "small"}
    assert as_json("cache", "verify", "--cache", url)["bad"] == []
    fs = fsspec.filesystem("s3")
    (blob,) = [p for p in fs.find(f"{s3_bucket}/cli/{BLOBS}") if fs.size(p) < 150_000][:1]
    fs.rm_file(blob)
    missing = json.loads(cli("cache", "verify", "--cache", url, "--json", ok=False).output)["bad"]
    assert missing and all("missing" in item["problem"] for item in missing)
    cli("cache", "verify", "--cache", url, "--repair")
    assert as_json("cache", "verify", "--cache", url)["bad"] == []
    cli("cache", "clear", "--cache", url, "--yes")
    assert fs.find(f"{s3_bucket}/cli") == []


def test_python_dash_m_crystallize_and_the_default_cache(tmp_path):
    fill(tmp_path / ".cache")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "crystallize", "cache", "ls", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert str(tmp_path / ".cache") in report["store"]
    assert {r["step"] for r in report["steps"]} == {"big", "small"}
    env["CRYSTALLIZE_CACHE_DIR"] = str(tmp_path / "elsewhere")
    proc = subprocess.run(
        [sys.executable, "-m", "crystallize", "cache", "du"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "elsewhere" in proc.stdout
