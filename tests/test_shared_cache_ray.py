"""Ray: single flight across workers, outputs in the object store, a 3-node cluster.

In-session tests share the session's real local Ray (2 CPUs). The multi-node test
runs ``tests/scripts/shared_cache_cluster.py`` in its own process (a driver joins
one Ray only) against the session's S3 server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from crystallize import Experiment, LocalCacheStore, UrlStore, pipeline_step

pytest.importorskip("ray")

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RUNS = 16


@pipeline_step(cacheable=True)
def expensive(data, *, calls_file):
    with open(calls_file, "a") as fh:
        fh.write("call\n")
    time.sleep(0.5)
    return bytes(300_000), {"total": sum(data)}


def calls(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def ray_backend(**options):
    from crystallize_ray import RayExecution

    return RayExecution(batch_size=1, **options)


def s3_store(bucket: str, endpoint: str, prefix: str) -> UrlStore:
    # Workers of the session's Ray did not inherit this test's AWS environment.
    options = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    return UrlStore(f"s3://{bucket}/{prefix}", storage_options=options, local_dir=False)


@pytest.mark.parametrize("tier", [True, False], ids=["object-store-tier", "lease-files"])
def test_sixteen_runs_on_ray_compute_a_slow_step_once(tier, ray_session, tmp_path):
    counter = tmp_path / "calls.txt"
    exp = Experiment(
        lambda ctx: [1, 2, 3],
        [expensive(calls_file=str(counter))],
        replicates=RUNS,
        plugins=[ray_backend(object_store_cache=tier)],
        cache=LocalCacheStore(tmp_path / "cache"),
    )
    result = exp.run()
    assert result.errors == []
    assert result.metrics.baseline.metrics == {"total": [6] * RUNS}
    records = [run.provenance[0] for run in result.runs]
    assert calls(counter) == 1
    assert sorted(r.cache for r in records) == ["hit"] * (RUNS - 1) + ["miss"]
    assert any(r.waited > 0 for r in records if r.cache == "hit")  # the other task waited for it


def test_outputs_outlive_the_task_that_made_them(ray_session, s3_bucket, s3_server, tmp_path):
    counter = tmp_path / "calls.txt"
    store = s3_store(s3_bucket, s3_server, "outlive")

    def run(replicates: int):
        return Experiment(
            lambda ctx: [1, 2, 3],
            [expensive(calls_file=str(counter))],
            replicates=replicates,
            plugins=[ray_backend()],
            cache=store,
        ).run()

    assert run(1).runs[0].provenance[0].cache == "miss"
    fsspec.filesystem("s3").rm(f"{s3_bucket}/outlive", recursive=True)  # only Ray's object store has it
    again = run(4)
    assert [r.provenance[0].cache for r in again.runs] == ["hit"] * 4 and calls(counter) == 1


def test_a_dead_index_falls_back_to_the_durable_store(ray_session, s3_bucket, s3_server, tmp_path):
    import ray

    from crystallize_ray.cache_tier import INDEX_NAME, INDEX_NAMESPACE

    counter = tmp_path / "calls.txt"
    store = s3_store(s3_bucket, s3_server, "fallback")

    def run():
        result = Experiment(
            lambda ctx: [1, 2, 3],
            [expensive(calls_file=str(counter))],
            replicates=3,
            plugins=[ray_backend()],
            cache=store,
        ).run()
        assert result.errors == []
        return sorted(r.provenance[0].cache for r in result.runs)

    assert run() == ["hit", "hit", "miss"]
    ray.kill(ray.get_actor(INDEX_NAME, namespace=INDEX_NAMESPACE), no_restart=True)
    assert run() == ["hit"] * 3  # from the bucket; the tier stepped aside
    assert run() == ["hit"] * 3  # a new index was started and filled from the bucket
    index = ray.get_actor(INDEX_NAME, namespace=INDEX_NAMESPACE)
    assert ray.get(index.stats.remote())["objects"] > 0
    assert calls(counter) == 1


def test_the_index_keeps_at_most_its_bound_and_lost_objects_are_read_from_the_durable_store(ray_session, tmp_path):
    import ray

    from crystallize_ray.cache_tier import INDEX_NAMESPACE, ObjectStoreTier

    name = f"crystallize-test-index-{uuid.uuid4().hex[:8]}"
    durable = LocalCacheStore(tmp_path / "durable")
    tier = ObjectStoreTier(durable, scope="test", max_bytes=400_000, index_name=name)
    try:
        for i in range(5):
            tier.put("blobs", f"b{i}", bytes([i]) * 150_000)  # big: kept in the object store
        index = ray.get_actor(name, namespace=INDEX_NAMESPACE)
        stats = ray.get(index.stats.remote())
        assert stats == {"objects": 2, "bytes": 300_000, "leases": 0}  # the three oldest evicted
        assert tier.get("blobs", "b0") == bytes([0]) * 150_000  # evicted: read from the durable store
        # The index owns what it keeps: when it dies, so do those objects (Ray frees an
        # object with its owner), and the tier reads the durable store instead.
        ray.kill(index, no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError):  # wait until it is dead
            for _ in range(100):
                ray.get(index.stats.remote(), timeout=30)
                time.sleep(0.05)
        assert tier.get("blobs", "b4") == bytes([4]) * 150_000
    finally:
        try:
            ray.kill(ray.get_actor(name, namespace=INDEX_NAMESPACE))
        except ValueError:  # killed above
            pass


@pytest.mark.slow
def test_a_node_reuses_what_another_node_computed(s3_bucket, s3_server, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "scripts" / "shared_cache_cluster.py"),
            s3_server,
            s3_bucket,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    nodes = report["node_ids"]
    # In-cluster tier: computed once on node A; node B hit with the bucket emptied.
    assert [r["cache"] for r in report["tier_a"]] == ["miss", "hit"]
    assert {r["node"] for r in report["tier_a"]} == {nodes["a"]}
    assert [r["cache"] for r in report["tier_b"]] == ["hit", "hit"]
    assert {r["node"] for r in report["tier_b"]} == {nodes["b"]}
    # Durable tier alone: node B hit what node A stored in the bucket.
    assert [r["cache"] for r in report["durable_a"]] == ["miss", "hit"]
    assert [r["cache"] for r in report["durable_b"]] == ["hit", "hit"]
    assert report["calls"] == ["tier", "durable"]  # each computed once in the whole cluster
    # Each node read through its own local directory.
    assert report["local_a"] and report["local_b"]


def test_the_cluster_lease_of_a_dead_worker_lapses(ray_session, tmp_path):
    import ray

    from crystallize_ray.cache_tier import INDEX_NAMESPACE, ObjectStoreTier

    name = f"crystallize-test-index-{uuid.uuid4().hex[:8]}"
    tier = ObjectStoreTier(None, scope="test", index_name=name)

    @ray.remote(max_retries=0, runtime_env={"env_vars": {"CRYSTALLIZE_CACHE_LEASE_SECONDS": "3"}})
    def take_the_lease_and_die(tier):
        import os

        (lease,) = tier.lease_scopes("step", "input")
        assert lease.acquire(False)
        os._exit(1)  # the worker dies holding the lease: no release, no heartbeat

    try:
        with pytest.raises(ray.exceptions.RayError):
            ray.get(take_the_lease_and_die.remote(tier), timeout=60)
        (lease,) = tier.lease_scopes("step", "input")
        started = time.monotonic()
        assert not lease.acquire(False)  # the dead worker's lease is still there...
        while not lease.acquire(False):  # ...until it lapses, 3 s after it was taken
            lease.wait(0.5)
            assert time.monotonic() - started < 15
        lease.release()
    finally:
        ray.kill(ray.get_actor(name, namespace=INDEX_NAMESPACE))
