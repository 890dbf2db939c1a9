"""The step cache in object storage: a real S3 server on loopback, real processes.

The session's S3 server is moto's, spoken to through s3fs as AWS or MinIO would be
(``s3_bucket`` in conftest.py: a fresh bucket, the standard AWS environment set).
Executions are counted in files; what the bucket holds is listed with s3fs.
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

import fsspec
import pytest
from _counting import count_call, executions, start_counting
from _processes import run_released_together

from crystallize import Experiment, FrozenContext, Pipeline, UrlStore, pipeline_step
from crystallize.entries import BLOBS, MAGIC, decode_entry, read_header
from crystallize.signing import MAC_SIZE, cache_key, key_from_text, sign
from crystallize.stores import LocalCacheStore, open_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def counter(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CRYSTALLIZE_CACHE_DIR", raising=False)
    monkeypatch.delenv("CRYSTALLIZE_CACHE_URL", raising=False)
    return start_counting(tmp_path, monkeypatch)


@pipeline_step(cacheable=True)
def featurize(data):
    count_call()
    return bytes(range(256)) * (len(data) * 64), {"n": len(data)}  # 1 MB for 64 items: a blob


@pipeline_step(cacheable=True)
def summarize(data):
    count_call()
    return len(data), {"size": len(data)}  # small: inline in its manifest


def objects(bucket: str) -> dict[str, int]:
    """Every object in the bucket: path below the bucket -> size."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return {p.split("/", 1)[1]: info["size"] for p, info in fs.find(bucket, detail=True).items()}


def experiment(cache, replicates=3) -> Experiment:
    return Experiment(lambda ctx: list(range(64)), [featurize(), summarize()], replicates=replicates, cache=cache)


def statuses(result) -> list[list[str]]:
    return [[p.cache for p in run.provenance] for run in result.runs]


def test_a_url_cache_keeps_signed_manifests_and_content_addressed_blobs(s3_bucket, counter):
    url = f"s3://{s3_bucket}/team/cache"
    first = experiment(url).run()
    assert first.errors == [] and executions(counter) == 2
    assert statuses(first) == [["miss", "miss"], ["hit", "hit"], ["hit", "hit"]]
    stored = objects(s3_bucket)
    record = first.runs[0].provenance[0]
    manifest = f"team/cache/{record.step_hash}/{record.input_hash}"
    (blob,) = [p for p in stored if p.startswith(f"team/cache/{BLOBS}/")]
    assert stored[blob] > 1 << 20 > stored[manifest]
    assert not [p for p in stored if p.endswith(".lease")]  # released
    # The manifest's header names the step and the blob; its MAC binds its slot.
    frame = fsspec.filesystem("s3").cat_file(f"{s3_bucket}/{manifest}")
    header = read_header(frame)
    assert header["step"] == "featurize" and header["blob"] == blob.rsplit("/", 1)[1]
    # Another experiment with the same cache URL (and a fresh local copy) hits.
    again = experiment(UrlStore(url, local_dir=Path("other-local"))).run()
    assert statuses(again) == [["hit", "hit"]] * 3 and executions(counter) == 2
    assert again.metrics.baseline.metrics == first.metrics.baseline.metrics


def test_the_cache_url_variable_is_the_default_store(s3_bucket, counter, monkeypatch):
    monkeypatch.setenv("CRYSTALLIZE_CACHE_URL", f"s3://{s3_bucket}/from-env")
    assert repr(open_store()) == f"UrlStore('s3://{s3_bucket}/from-env')"
    ctx = FrozenContext()
    Pipeline([summarize()]).run([1, 2], ctx)
    Pipeline([summarize()]).run([1, 2], ctx2 := FrozenContext())
    assert [ctx.provenance[0].cache, ctx2.provenance[0].cache] == ["miss", "hit"]
    assert any(p.startswith("from-env/") for p in objects(s3_bucket))


def test_storage_options_reach_the_filesystem(s3_bucket, s3_server, counter, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the options say where the server is
    store = UrlStore(f"s3://{s3_bucket}/opts", storage_options={"endpoint_url": s3_server}, local_dir=False)
    assert [statuses(experiment(store, 1).run()), statuses(experiment(store, 1).run())] == [
        [["miss", "miss"]],
        [["hit", "hit"]],
    ]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # for this test's own listing
    assert any(p.startswith("opts/") for p in objects(s3_bucket))


DRIVER = """\
import json, os, sys
sys.path.insert(0, sys.argv[1])
import shared_steps
from crystallize import Experiment
result = Experiment(lambda ctx: list(range(64)), [shared_steps.heavy()], replicates=4).run()
print(json.dumps({"cwd": os.getcwd(), "errors": len(result.errors),
                  "cache": [run.provenance[0].cache for run in result.runs],
                  "n": result.metrics.baseline.metrics["n"]}))
"""

STEPS = """\
import os
from crystallize import pipeline_step

@pipeline_step(cacheable=True)
def heavy(data):
    with open(os.environ["CRYSTALLIZE_TEST_COUNTER"], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    return bytes(200_000), {"n": len(data)}
"""


def test_two_drivers_in_different_directories_share_one_bucket(s3_bucket, counter, tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "shared_steps.py").write_text(STEPS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CRYSTALLIZE_CACHE_URL": f"s3://{s3_bucket}/jobs"}
    reports = []
    for name in ("laptop", "cluster-node"):
        (tmp_path / name).mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(tmp_path / "mods")],
            cwd=tmp_path / name,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = reports
    assert first["cache"] == ["miss", "hit", "hit", "hit"]
    assert second["cache"] == ["hit"] * 4  # the second driver computed nothing
    assert executions(counter) == 1
    # Each driver read through its own working directory's local copy.
    assert first["cwd"] != second["cwd"]
    for name in ("laptop", "cluster-node"):
        assert list((tmp_path / name / ".cache" / BLOBS).iterdir())


WRITER = """\
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from crystallize import FrozenContext, Pipeline
import shared_steps
Path(os.environ["READY_DIR"], str(os.getpid())).touch()
while not Path(os.environ["GATE"]).exists():
    time.sleep(0.002)
ctx = FrozenContext()
Pipeline([shared_steps.heavy()]).run(list(range(64)), ctx)
print(json.dumps({"cache": ctx.provenance[0].cache}))
"""


def test_concurrent_writers_of_one_key_on_s3_leave_one_valid_manifest(s3_bucket, counter, tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "shared_steps.py").write_text(
        STEPS.replace("return bytes", "import time; time.sleep(0.3); return bytes")
    )
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    ready.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CRYSTALLIZE_CACHE_URL": f"s3://{s3_bucket}/race",
        "READY_DIR": str(ready),
        "GATE": str(gate),
        "CRYSTALLIZE_CACHE_MAX_WAIT": "0",
    }  # no single flight: the writers really race
    command = [sys.executable, "-c", WRITER, str(tmp_path / "mods")]
    run_released_together(command, [tmp_path / f"w{i}" for i in range(6)], env, ready, gate, what="writers")
    assert executions(counter) >= 2  # they raced
    stored = objects(s3_bucket)
    manifests = [
        p
        for p in stored
        if p.count("/") == 2 and not p.startswith(f"race/{BLOBS}/") and not p.endswith(("/last", ".lease"))
    ]
    assert len(manifests) == 1 and len([p for p in stored if f"/{BLOBS}/" in p]) == 1
    # The one manifest is whole and verifies in its slot: a fresh process hits it.
    ctx = FrozenContext()
    sys.path.insert(0, str(tmp_path / "mods"))
    try:
        import shared_steps

        before = executions(counter)
        Pipeline([shared_steps.heavy()]).run(list(range(64)), ctx, cache=f"s3://{s3_bucket}/race")
    finally:
        sys.path.remove(str(tmp_path / "mods"))
        sys.modules.pop("shared_steps", None)
    assert ctx.provenance[0].cache == "hit" and executions(counter) == before


def test_a_deleted_blob_is_a_miss_and_is_repaired(s3_bucket, counter, caplog):
    url = f"s3://{s3_bucket}/repair"
    experiment(UrlStore(url, local_dir=False), 1).run()
    fs = fsspec.filesystem("s3")
    (blob,) = [p for p in objects(s3_bucket) if f"/{BLOBS}/" in p]
    fs.rm_file(f"{s3_bucket}/{blob}")
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = experiment(UrlStore(url, local_dir=False), 2).run()
    assert statuses(result) == [["miss", "hit"], ["hit", "hit"]]
    assert executions(counter) == 3
    assert "which is missing; recomputing it" in caplog.text
    assert blob in objects(s3_bucket)  # stored again
    assert statuses(experiment(UrlStore(url, local_dir=False), 1).run()) == [["hit", "hit"]]


def test_a_manifest_moved_into_another_keys_slot_is_refused(s3_bucket, counter, caplog):
    url = f"s3://{s3_bucket}/moved"
    first = Experiment(lambda ctx: [1, 2, 3], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    second = Experiment(lambda ctx: [4, 5], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    a, b = first.runs[0].provenance[0], second.runs[0].provenance[0]
    fs = fsspec.filesystem("s3")
    # A valid, signed manifest copied over another key's: it would replay size=3 for [4, 5].
    fs.pipe_file(
        f"{s3_bucket}/moved/{b.step_hash}/{b.input_hash}",
        fs.cat_file(f"{s3_bucket}/moved/{a.step_hash}/{a.input_hash}"),
    )
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        again = Experiment(lambda ctx: [4, 5], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    assert again.metrics.baseline.metrics == {"size": [2]}
    assert again.runs[0].provenance[0].cache == "miss"
    assert "moved from another key's slot" in caplog.text


class CreatesAFile:
    """Unpickling this creates ``marker``: code runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("mac", ["zero", "another-key"])
def test_a_forged_manifest_in_the_bucket_is_never_unpickled(mac, s3_bucket, counter, tmp_path, caplog):
    url = f"s3://{s3_bucket}/forged"
    result = Experiment(lambda ctx: [1, 2, 3], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    record = result.runs[0].provenance[0]
    marker = tmp_path / "pwned"
    header = json.dumps({"kind": "entry", "step": "summarize", "blob": None}).encode()
    body = len(header).to_bytes(4, "big") + header + pickle.dumps({"output": CreatesAFile(marker)})
    where = f"{record.step_hash}/{record.input_hash}".encode()
    signature = bytes(MAC_SIZE) if mac == "zero" else sign(body, key_from_text("not ours"), where)
    fsspec.filesystem("s3").pipe_file(
        f"{s3_bucket}/forged/{record.step_hash}/{record.input_hash}", MAGIC + signature + body
    )
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        again = Experiment(lambda ctx: [1, 2, 3], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    assert not marker.exists()
    assert again.metrics.baseline.metrics == {"size": [3]} and again.runs[0].provenance[0].cache == "miss"
    assert "does not verify" in caplog.text
    # Rewritten with this user's key, in its own slot.
    frame = fsspec.filesystem("s3").cat_file(f"{s3_bucket}/forged/{record.step_hash}/{record.input_hash}")
    assert decode_entry(frame, cache_key(), where=where.decode()).output == 3


def test_an_unreachable_store_costs_one_warning_not_a_run(counter, monkeypatch, caplog):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        result = experiment(UrlStore("s3://nowhere/cache", local_dir=False), 3).run()
    assert result.errors == [] and result.metrics.baseline.metrics["n"] == [64] * 3
    assert {s for run in statuses(result) for s in run} == {"error"}
    assert "the cache steps aside" in caplog.text


def test_a_missing_s3fs_names_the_extra_to_install(tmp_path):
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from crystallize import Experiment, pipeline_step\n"
        "@pipeline_step(cacheable=True)\n"
        "def one(data):\n"
        "    return data\n"
        "try:\n"
        "    Experiment(lambda ctx: 1, [one()], cache='s3://bucket/cache').run()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    assert "pip install 'crystallize-lab[s3]'" in proc.stdout, proc.stderr[-2000:]


def test_memory_and_file_urls(tmp_path, counter):
    assert open_store(f"file://{tmp_path}/dir") == LocalCacheStore(tmp_path / "dir")
    store = open_store("memory://crystallize-test")
    assert isinstance(store, UrlStore) and store.local is None  # no local copy of memory
    assert statuses(experiment(store, 2).run()) == [["miss", "miss"], ["hit", "hit"]]


def test_last_use_is_rewritten_at_most_once_an_hour(s3_bucket, counter, monkeypatch):
    from crystallize import cache as cache_module

    url = f"s3://{s3_bucket}/touch"
    Experiment(lambda ctx: [1], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    fs = fsspec.filesystem("s3")
    (path,) = [p for p in objects(s3_bucket) if p.startswith("touch/") and not p.endswith("/last")]
    created = read_header(fs.cat_file(f"{s3_bucket}/{path}"))["used"]
    time.sleep(0.05)
    Experiment(lambda ctx: [1], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    assert read_header(fs.cat_file(f"{s3_bucket}/{path}"))["used"] == created  # a recent use: no write
    monkeypatch.setattr(cache_module, "TOUCH_SECONDS", 0.0)
    Experiment(lambda ctx: [1], [summarize()], cache=UrlStore(url, local_dir=False)).run()
    assert read_header(fs.cat_file(f"{s3_bucket}/{path}"))["used"] > created
