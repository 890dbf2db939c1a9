"""Where a cache hit comes from, and what single flight saves, side by side.

Usage::

    python benchmarks/bench_shared_cache.py [--hits 40] [--skip-ray]

Starts a real S3 server (moto) on loopback and a 3-node local Ray cluster (a head
with no CPUs and two worker nodes), then measures:

1. One cache hit of a step whose output is 1 MB (kept in a blob) and of one whose
   output is small (inline in its manifest), as the median ``StepRecord.seconds``
   of ``--hits`` hits (lookup, signature and digest checks, unpickling, replay) from:
   a local directory; the local read-through copy of a bucket; the bucket itself
   over loopback S3; Ray's object store on another node (computed on node A, read on
   node B one task at a time, the bucket emptied in between). Ratios are against the
   local directory.
2. 16 runs that all need one 0.5 s cacheable step with a 1 MB output, on a process
   pool (4 workers, the bucket behind a local copy) and on the Ray cluster (8 task
   slots, the bucket behind the in-cluster tier), with single flight and without
   it (``CRYSTALLIZE_CACHE_MAX_WAIT=0``): computations, runs that waited and the
   longest wait, wall seconds, the steps' own seconds summed over runs (computing,
   storing, looking up: what the workers spent, waits excluded), bytes uploaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import crystallize
from crystallize import (
    Experiment,
    LocalCacheStore,
    ParallelExecution,
    ReadThroughStore,
    UrlStore,
    pipeline_step,
)
from crystallize.stores import FsspecStore

ONE_MB = 1 << 20
RUNS = 16


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


@pipeline_step(cacheable=True)
def one_mb(data):
    return bytes(range(256)) * (ONE_MB // 256), {"n": len(data)}


@pipeline_step(cacheable=True)
def small(data):
    return list(data), {"n": len(data)}


@pipeline_step(cacheable=True)
def shared_step(data, *, calls_file):
    with open(calls_file, "a") as fh:
        fh.write("call\n")
    time.sleep(0.5)
    return os.urandom(ONE_MB), {"value": 1}


@pipeline_step(cacheable=True)
def warm_up(data, ctx):
    time.sleep(0.2)
    return data, {"value": ctx["replicate"]}  # reads the replicate: one entry per run


class CountingRemote(FsspecStore):
    """The bucket, counting the bytes written to it (in a file: workers write too)."""

    def __init__(self, url: str, ledger: str) -> None:
        super().__init__(url)
        self.ledger = ledger

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "ledger": self.ledger}

    def _count(self, blob: bytes) -> None:
        with open(self.ledger, "a") as fh:
            fh.write(f"{len(blob)}\n")

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self._count(blob)
        super().put(namespace, key, blob)

    def put_new(self, namespace: str, key: str, blob: bytes) -> bool:
        self._count(blob)
        return super().put_new(namespace, key, blob)


def hit_seconds(step: Any, store: Any, hits: int, plugins: list | None = None, data: Any = None) -> float:
    """Median seconds of a hit of ``step`` (warmed once first)."""
    data = list(range(64)) if data is None else data
    Experiment(lambda ctx: data, [step], cache=store, plugins=plugins).run()
    result = Experiment(lambda ctx: data, [step], cache=store, replicates=hits, plugins=plugins).run()
    records = [run.provenance[0] for run in result.runs]
    assert all(r.cache == "hit" for r in records), [r.cache for r in records]
    return statistics.median(r.seconds for r in records)


def start_s3() -> Any:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import fsspec

    fsspec.filesystem("s3").mkdir("bench")
    return server


def start_cluster(root: Path) -> Any:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback cluster for this benchmark only
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for name in ("a", "b"):
        cluster.add_node(
            num_cpus=4, resources={f"node_{name}": 4}, env_vars={"CRYSTALLIZE_CACHE_DIR": str(root / f"node-{name}")}
        )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    return cluster


def ray_tier_hit(step: Any, hits: int, url: str) -> float:
    """A hit on node B of what node A computed, with the bucket emptied in between."""
    import fsspec

    from crystallize_ray import RayExecution

    store = UrlStore(url, local_dir=False)  # every hit on B goes to the in-cluster tier
    data = list(range(64))
    Experiment(lambda ctx: data, [step], cache=store, plugins=[RayExecution(resources={"node_a": 1})]).run()
    fsspec.filesystem("s3").rm(url.removeprefix("s3://"), recursive=True)
    # One task at a time (each takes all of node B), as the other tiers are measured.
    result = Experiment(
        lambda ctx: data,
        [step],
        cache=store,
        replicates=hits,
        plugins=[RayExecution(resources={"node_b": 4}, batch_size=1)],
    ).run()
    records = [run.provenance[0] for run in result.runs]
    assert all(r.cache == "hit" for r in records), [r.cache for r in records]
    return statistics.median(r.seconds for r in records)


OUTPUTS = (("1 MB output (blob)", one_mb), ("small output (inline)", small))


def bench_local_hits(root: Path, hits: int) -> dict[str, list[tuple[str, float]]]:
    """Hits in this process, before the cluster starts (nothing else competes)."""
    found = {}
    for label, step in OUTPUTS:
        url = f"s3://bench/hits-{label.split()[0]}"
        found[label] = [
            ("local directory", hit_seconds(step(), LocalCacheStore(root / f"dir-{label.split()[0]}"), hits)),
            (
                "local read-through copy",
                hit_seconds(step(), UrlStore(url, local_dir=root / f"rt-{label.split()[0]}"), hits),
            ),
            ("S3 on loopback", hit_seconds(step(), UrlStore(url, local_dir=False), hits)),
        ]
    return found


def print_hits(found: dict[str, list[tuple[str, float]]], hits: int) -> None:
    rows = []
    for label, tiers in found.items():
        local = tiers[0][1]
        rows += [[label, tier, f"{seconds * 1e3:.3f}", f"{seconds / local:.2f}x"] for tier, seconds in tiers]
    table(
        f"1. One cache hit, median of {hits} (StepRecord.seconds)",
        ["output", "from", "ms per hit", "vs local directory"],
        rows,
    )


def sixteen_runs(root: Path, name: str, backend: Any, store_for: Any, single_flight: bool) -> list[Any]:
    calls = root / f"{name}-{single_flight}.calls"
    ledger = root / f"{name}-{single_flight}.bytes"
    os.environ["CRYSTALLIZE_CACHE_MAX_WAIT"] = "900" if single_flight else "0"
    store = store_for(CountingRemote(f"s3://bench/sixteen-{name}-{single_flight}", str(ledger)))
    exp = Experiment(
        lambda ctx: [1], [shared_step(calls_file=str(calls))], plugins=[backend], replicates=RUNS, cache=store
    )
    started = time.perf_counter()
    result = exp.run()
    seconds = time.perf_counter() - started
    assert result.errors == [], result.errors[:1]
    computed = len(calls.read_text().splitlines())
    uploaded = sum(int(x) for x in ledger.read_text().split()) if ledger.exists() else 0
    waits = [run.provenance[0].waited for run in result.runs if run.provenance[0].waited > 0]
    busy = sum(run.provenance[0].seconds - run.provenance[0].waited for run in result.runs)
    return [
        name,
        "on" if single_flight else "off",
        computed,
        len(waits),
        f"{max(waits, default=0):.2f}",
        f"{seconds:.2f}",
        f"{busy:.2f}",
        f"{uploaded / ONE_MB:.1f}",
    ]


def bench_sixteen(root: Path, with_ray: bool) -> None:
    rows = []
    for single_flight in (True, False):
        rows.append(
            sixteen_runs(
                root,
                "process pool (4)",
                ParallelExecution(max_workers=4, executor_type="process"),
                lambda remote: ReadThroughStore(remote, root / "pool-local"),
                single_flight,
            )
        )
    if with_ray:
        from crystallize_ray import RayExecution

        for single_flight in (True, False):
            env = {"CRYSTALLIZE_CACHE_MAX_WAIT": "900" if single_flight else "0"}
            backend = RayExecution(runtime_env={"env_vars": env}, batch_size=1)
            # Start the 8 workers of this runtime environment, and let each load s3fs and
            # find the index actor, first: not what is compared.
            warm = ReadThroughStore(FsspecStore(f"s3://bench/warm-{single_flight}"), None)
            Experiment(lambda ctx: [1], [warm_up()], replicates=RUNS, plugins=[backend], cache=warm).run()
            rows.append(
                sixteen_runs(
                    root, "Ray, 2 nodes (8)", backend, lambda remote: ReadThroughStore(remote, None), single_flight
                )
            )
    table(
        f"2. {RUNS} runs needing one 0.5 s step with a 1 MB output",
        [
            "backend",
            "single flight",
            "computed",
            "runs that waited",
            "longest wait s",
            "wall s",
            "step s (not waiting)",
            "MB uploaded",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=100)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    print(
        f"crystallize {crystallize.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    root = Path(tempfile.mkdtemp(prefix="crystallize-bench-shared-"))
    os.environ["CRYSTALLIZE_CACHE_KEY"] = "bench"  # one key for the driver, the pool and the cluster
    server = start_s3()
    cluster = None
    try:
        found = bench_local_hits(root, args.hits)
        if not args.skip_ray:
            cluster = start_cluster(root)
            for label, step in OUTPUTS:
                url = f"s3://bench/ray-{label.split()[0]}"
                found[label].append(("Ray object store, other node", ray_tier_hit(step(), args.hits, url)))
        print_hits(found, args.hits)
        bench_sixteen(root, with_ray=cluster is not None)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
