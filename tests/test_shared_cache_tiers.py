"""The local read-through tier: read a remote entry once, then from this machine's disk.

The remote is a real bucket on the session's S3 server (or a real directory standing
for one); remote reads are counted by a real store that counts, not a mock.
"""

from __future__ import annotations

import logging
import os
import threading

import fsspec
import pytest
from _counting import count_call, executions, start_counting

from crystallize import (
    Experiment,
    LocalCacheStore,
    ReadThroughStore,
    UrlStore,
    pipeline_step,
)
from crystallize.stores import FsspecStore


@pytest.fixture(autouse=True)
def counter(tmp_path, monkeypatch):
    monkeypatch.delenv("CRYSTALLIZE_CACHE_DIR", raising=False)
    monkeypatch.delenv("CRYSTALLIZE_CACHE_URL", raising=False)
    return start_counting(tmp_path, monkeypatch)


@pipeline_step(cacheable=True)
def embed(data):
    count_call()
    return bytes(300_000), {"n": len(data)}


def run(store, replicates=2):
    result = Experiment(lambda ctx: [1, 2, 3], [embed()], replicates=replicates, cache=store).run()
    assert result.errors == []
    return [run.provenance[0].cache for run in result.runs]


class CountingRemote(FsspecStore):
    """A real S3 store that counts the objects it downloads."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gets = 0
        self.lock = threading.Lock()

    def get(self, namespace, key):
        with self.lock:
            self.gets += 1
        return super().get(namespace, key)


def test_a_node_reads_a_remote_entry_once_then_from_its_disk(s3_bucket, counter, tmp_path):
    url = f"s3://{s3_bucket}/tiers"
    assert run(UrlStore(url, local_dir=tmp_path / "node-a")) == ["miss", "hit"]
    remote = CountingRemote(url)
    node_b = ReadThroughStore(remote, tmp_path / "node-b")
    assert run(node_b) == ["hit", "hit"] and executions(counter) == 1
    assert remote.gets == 2  # the manifest and the blob, once each
    assert run(node_b, replicates=5) == ["hit"] * 5 and remote.gets == 2
    # The bucket can even go away: node B has what it needs.
    fsspec.filesystem("s3").rm(f"{s3_bucket}/tiers", recursive=True)
    assert run(ReadThroughStore(CountingRemote(url), tmp_path / "node-b")) == ["hit", "hit"]


def test_the_local_copy_is_bounded_and_evicts_the_least_recently_used(tmp_path):
    remote = LocalCacheStore(tmp_path / "remote")
    tier = ReadThroughStore(remote, tmp_path / "local", max_bytes=3500)
    for i in range(6):
        tier.put("ns", f"k{i}", bytes(1000))
        tier.get("ns", "k0")  # k0 stays in use
    local = [o.key for o in LocalCacheStore(tmp_path / "local").walk()]
    assert sum(o.size for o in LocalCacheStore(tmp_path / "local").walk()) <= 3500
    assert "k0" in local and "k1" not in local and "k5" in local
    assert len(list(remote.walk())) == 6  # the remote keeps everything
    assert tier.get("ns", "k1") == bytes(1000)  # read through again


def test_one_download_per_machine_at_a_time(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/download"
    FsspecStore(url).put("blobs", "big", os.urandom(4 << 20))
    remote = CountingRemote(url)
    barrier = threading.Barrier(8)
    got: list[bytes] = []

    def reader() -> None:
        tier = ReadThroughStore(remote, tmp_path / "shared-local")  # a process's own store object
        barrier.wait()
        got.append(tier.get("blobs", "big"))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 8 and len(set(got)) == 1
    assert remote.gets == 1  # the others waited on the machine's lock and read the local copy


def test_a_failing_local_copy_steps_aside_with_one_warning(s3_bucket, counter, tmp_path, caplog):
    (tmp_path / "not-a-dir").write_text("a file where the local copy should be")
    store = UrlStore(f"s3://{s3_bucket}/aside", local_dir=tmp_path / "not-a-dir")
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        assert run(store, 3) == ["miss", "hit", "hit"]
    warnings = [r.getMessage() for r in caplog.records if "steps aside" in r.getMessage()]
    assert warnings and all("local copy" in w or "Single flight" in w for w in warnings)


def test_a_url_store_ships_without_its_filesystem_and_resolves_its_local_copy_where_it_runs(
    s3_bucket, tmp_path, monkeypatch
):
    import cloudpickle

    store = UrlStore(f"s3://{s3_bucket}/ship")
    store.put("ns", "k", b"x")
    monkeypatch.setenv("CRYSTALLIZE_CACHE_DIR", str(tmp_path / "worker-disk"))
    shipped = cloudpickle.loads(cloudpickle.dumps(store))
    assert shipped.local.root == tmp_path / "worker-disk"
    assert shipped.get("ns", "k") == b"x" and (tmp_path / "worker-disk" / "ns" / "k.pkl").is_file()
