"""Hashing throughput and step-cache overhead, side by side with the raw alternatives.

Usage::

    python benchmarks/bench_cache.py [--repeat 5] [--array-mb 256]

Measures, each as the best of ``--repeat`` timings:

1. ``crystallize.hash_value`` on a float64 numpy array (256 MB by default), in GB/s,
   beside raw ``xxhash.xxh3_128`` over the same buffer (the floor: ratio = ours / raw
   time) and ``hashlib.sha256`` for scale.
2. ``hash_value`` on a 1M-element list of floats and one of ints, in elements/s and
   MB/s of 8-byte elements, beside ``pickle.dumps`` + xxh3 of the same list.
3. The cost of a cache hit for a step whose output is 1 MB (a numpy array, and a
   ``bytes`` object), in ms per hit, beside running the same pipeline uncached.
4. Cold and warm runs of a 3-step pipeline whose cacheable middle step sleeps 0.1 s.
5. Signing and verifying an entry body, in µs per MB, beside keyed blake2b (the
   other stdlib MAC) and the unkeyed xxh3 checksum entries carried before they were
   signed, each also as a share of the 1 MB numpy cache hit measured in 3.
6. What keying a cacheable step on a small input costs, per step, with randomness
   capture (the generators' states keyed at entry and restored on a hit) beside the
   same pipeline with capture turned off: a hit and a miss for a step that draws
   nothing, and for one that draws from numpy's global generator and ``ctx["rng"]``;
   plus the capture-and-compare itself, done once per executed cacheable step.

The cache lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

import crystallize
from crystallize import FrozenContext, LocalCacheStore, Pipeline, hash_value, pipeline_step
from crystallize.signing import key_from_text, sign, verify

ONE_MB = 1 << 20


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """The fastest of ``repeat`` wall-clock timings of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def table(title: str, header: list[str], rows: list[list[str]], text_columns: int = 1) -> None:
    """Print rows under a header; the first ``text_columns`` are left-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(line)
    for row in rows:
        print(
            "  ".join(
                str(c).rjust(w) if i >= text_columns else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
        )


# -- 1. array hashing -----------------------------------------------------------------


def bench_array(repeat: int, megabytes: int) -> None:
    arr = np.random.default_rng(0).random(megabytes * ONE_MB // 8)
    size_gb = arr.nbytes / 1e9
    buf = memoryview(arr).cast("B")
    ours = best_of(repeat, lambda: hash_value(arr))
    raw = best_of(repeat, lambda: xxhash.xxh3_128(buf).hexdigest())
    sha = best_of(max(1, repeat // 2), lambda: hashlib.sha256(buf).hexdigest())
    table(
        f"1. Hashing a {arr.nbytes // ONE_MB} MB float64 numpy array",
        ["method", "seconds", "GB/s", "time vs raw xxh3"],
        [
            ["crystallize.hash_value", f"{ours:.4f}", f"{size_gb / ours:.2f}", f"{ours / raw:.2f}x"],
            ["xxhash.xxh3_128 (raw buffer)", f"{raw:.4f}", f"{size_gb / raw:.2f}", "1.00x"],
            ["hashlib.sha256 (raw buffer)", f"{sha:.4f}", f"{size_gb / sha:.2f}", f"{sha / raw:.2f}x"],
        ],
    )


# -- 2. list hashing ------------------------------------------------------------------


def bench_lists(repeat: int) -> None:
    n = 1_000_000
    rng = random.Random(0)
    lists = {
        "list of 1M floats": [rng.random() for _ in range(n)],
        "list of 1M ints": [rng.randrange(-(2**40), 2**40) for _ in range(n)],
    }
    rows = []
    for label, values in lists.items():
        ours = best_of(repeat, lambda: hash_value(values))
        alt = best_of(repeat, lambda: xxhash.xxh3_128(pickle.dumps(values, protocol=5)).hexdigest())
        for method, seconds in (("crystallize.hash_value", ours), ("pickle.dumps + xxh3", alt)):
            rows.append(
                [
                    label,
                    method,
                    f"{seconds * 1e3:.1f}",
                    f"{n / seconds / 1e6:.1f}",
                    f"{n * 8 / seconds / 1e6:.0f}",
                    f"{seconds / alt:.2f}x",
                ]
            )
    table(
        "2. Hashing Python lists (MB/s counts 8 bytes per element)",
        ["input", "method", "ms", "M elements/s", "MB/s", "time vs pickle+xxh3"],
        rows,
        text_columns=2,
    )


# -- 3. cost of a cache hit -----------------------------------------------------------


@pipeline_step(cacheable=True)
def make_array(data):
    return np.full(ONE_MB // 8, float(data))


@pipeline_step(cacheable=True)
def make_bytes(data):
    return bytes([data % 256]) * ONE_MB


def bench_hits(repeat: int, cache_root: Path) -> float:
    """Print the hit table; return the seconds of one 1 MB numpy hit."""
    store = LocalCacheStore(cache_root / "hits")
    rows, hits = [], []
    for label, step in (("1 MB numpy array", make_array), ("1 MB bytes", make_bytes)):
        pipeline = Pipeline([step])
        pipeline.run(7, cache=store)  # store the entry
        check = FrozenContext()
        pipeline.run(7, check, cache=store)
        assert check.provenance[0].cache == "hit"
        loops = 50
        hit = best_of(repeat, lambda: [pipeline.run(7, cache=store) for _ in range(loops)]) / loops
        uncached = best_of(repeat, lambda: [pipeline.run(7, cache=False) for _ in range(loops)]) / loops
        rows.append([label, f"{hit * 1e3:.3f}", f"{uncached * 1e3:.3f}", f"{hit / uncached:.1f}x"])
        hits.append(hit)
    table(
        "3. A cache hit for a step with 1 MB of output (Pipeline.run, per call)",
        ["output", "hit ms", "uncached ms", "hit vs uncached"],
        rows,
    )
    return hits[0]


# -- 4. cold vs warm pipeline ---------------------------------------------------------


@pipeline_step()
def load(data, *, n=1000):
    return list(range(data, data + n))


@pipeline_step(cacheable=True)
def slow_transform(data):
    time.sleep(0.1)
    return [x * 2 for x in data]


@pipeline_step()
def summarize(data):
    return data, {"total": sum(data)}


def bench_cold_warm(repeat: int, cache_root: Path) -> None:
    pipeline = Pipeline([load, slow_transform, summarize])
    cold, warm = float("inf"), float("inf")
    for i in range(repeat):
        store = LocalCacheStore(cache_root / f"cold-warm-{i}")
        start = time.perf_counter()
        pipeline.run(1, cache=store)
        cold = min(cold, time.perf_counter() - start)
        ctx = FrozenContext()
        start = time.perf_counter()
        pipeline.run(1, ctx, cache=store)
        warm = min(warm, time.perf_counter() - start)
        assert [r.cache for r in ctx.provenance] == ["off", "hit", "off"]
    table(
        "4. A 3-step pipeline whose cacheable step sleeps 0.1 s",
        ["run", "ms", "speed-up"],
        [
            ["cold (empty cache)", f"{cold * 1e3:.2f}", "1.0x"],
            ["warm (cache hit)", f"{warm * 1e3:.2f}", f"{cold / warm:.0f}x"],
        ],
    )


# -- 5. signing ----------------------------------------------------------------------


def bench_signing(repeat: int, hit_seconds: float) -> None:
    body = np.random.default_rng(0).bytes(ONE_MB)
    key = key_from_text("benchmark")
    mac = sign(body, key)
    assert verify(mac, body, key)
    loops = 200
    timings = [
        ("sign (AES-GMAC, ours)", lambda: sign(body, key)),
        ("verify (AES-GMAC, ours)", lambda: verify(mac, body, key)),
        ("keyed blake2b (alternative)", lambda: hashlib.blake2b(body, key=key).digest()),
        ("xxh3-128 checksum (before signing)", lambda: xxhash.xxh3_128_digest(body)),
    ]
    rows = []
    for label, fn in timings:
        seconds = best_of(repeat, lambda: [fn() for _ in range(loops)]) / loops
        rows.append([label, f"{seconds * 1e6:.0f}", f"{ONE_MB / seconds / 1e9:.2f}", f"{seconds / hit_seconds:.0%}"])
    table(
        "5. Signing and verifying 1 MB of entry body",
        ["method", "µs per MB", "GB/s", "share of a 1 MB hit"],
        rows,
    )


# -- 6. randomness capture ------------------------------------------------------------


@pipeline_step(cacheable=True)
def draws_nothing(data):
    return data + 1


@pipeline_step(cacheable=True)
def draws_numbers(data, ctx):
    return data + float(np.random.random()) + ctx["rng"].random()


class MemoryStore:
    """A real in-memory :class:`~crystallize.CacheStore`, so disk I/O does not hide CPU costs."""

    def __init__(self) -> None:
        self.blobs: dict[tuple[str, str], bytes] = {}

    def get(self, namespace: str, key: str) -> bytes | None:
        return self.blobs.get((namespace, key))

    def put(self, namespace: str, key: str, blob: bytes) -> None:
        self.blobs[namespace, key] = blob

    def contains(self, namespace: str, key: str) -> bool:
        return (namespace, key) in self.blobs

    def delete(self, namespace: str, key: str) -> None:
        self.blobs.pop((namespace, key), None)


def bench_randomness(repeat: int) -> None:
    import crystallize.pipeline as pipeline_module
    from crystallize.randomness import capture, consumed

    def context() -> FrozenContext:
        np.random.seed(0)  # every call finds the generators in the same state
        return FrozenContext({"rng": random.Random(1), "numpy_rng": np.random.default_rng(1)})

    real_capture = pipeline_module.capture
    loops = 200
    fresh = iter(range(10**9))  # a new input, so a new key, for every miss

    def timed(capturing: bool, step: Any, kind: str, store: MemoryStore) -> float:
        pipeline = Pipeline([step])
        pipeline_module.capture = real_capture if capturing else (lambda ctx: [])
        try:
            if kind == "hit":
                calls = [lambda: pipeline.run(7, context(), cache=store)] * loops
            elif kind == "miss":
                calls = [lambda: pipeline.run(next(fresh), context(), cache=store)] * loops
            else:
                calls = [lambda: pipeline.run(7, context(), cache=False)] * loops
            start = time.perf_counter()
            for call in calls:
                call()
            return (time.perf_counter() - start) / loops
        finally:
            pipeline_module.capture = real_capture

    rows = []
    for label, step in (("draws nothing", draws_nothing), ("draws numbers", draws_numbers)):
        stores = {True: MemoryStore(), False: MemoryStore()}
        for capturing, store in stores.items():
            timed(capturing, step, "hit", store)  # store the entry the hits replay
        best: dict[tuple[str, bool], float] = {}
        for _ in range(repeat):  # on and off alternate, so drifting load hits both alike
            for kind in ("hit", "miss", "off"):
                for capturing in (True, False):
                    seconds = timed(capturing, step, kind, stores[capturing])
                    best[kind, capturing] = min(best.get((kind, capturing), float("inf")), seconds)
        for kind in ("hit", "miss"):
            on, without, off = best[kind, True], best[kind, False], best["off", True]
            rows.append(
                [
                    f"{label}, {kind}",
                    f"{on * 1e6:.0f}",
                    f"{without * 1e6:.0f}",
                    f"{(on - without) * 1e6:+.0f}",
                    f"{on / without:.2f}x",
                    f"{(on - off) * 1e6:.0f}",
                ]
            )
    ctx = context()
    capture_only = best_of(repeat, lambda: [consumed(capture(ctx)) for _ in range(loops)]) / loops
    rows.append(
        ["capture + compare alone (random, numpy, 2 ctx generators)", f"{capture_only * 1e6:.0f}", "-", "-", "-", "-"]
    )
    table(
        "6. Keying a cacheable step on a small input, with and without randomness capture "
        "(µs per Pipeline.run of one step, in-memory store)",
        ["step", "capture on", "capture off", "difference", "on vs off", "on, minus cache off"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--array-mb", type=int, default=256)
    args = parser.parse_args()

    print(
        f"crystallize {crystallize.__version__}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, xxhash {xxhash.VERSION}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; best of {args.repeat}"
    )
    cache_root = Path(tempfile.mkdtemp(prefix="crystallize-bench-"))
    try:
        bench_array(args.repeat, args.array_mb)
        bench_lists(args.repeat)
        hit = bench_hits(args.repeat, cache_root)
        bench_cold_warm(args.repeat, cache_root)
        bench_signing(args.repeat, hit)
        bench_randomness(args.repeat)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)


if __name__ == "__main__":
    main()
