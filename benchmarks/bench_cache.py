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
        print("  ".join(str(c).rjust(w) if i >= text_columns else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))


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
            rows.append([
                label, method, f"{seconds * 1e3:.1f}", f"{n / seconds / 1e6:.1f}",
                f"{n * 8 / seconds / 1e6:.0f}", f"{seconds / alt:.2f}x",
            ])
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
        [["cold (empty cache)", f"{cold * 1e3:.2f}", "1.0x"],
         ["warm (cache hit)", f"{warm * 1e3:.2f}", f"{cold / warm:.0f}x"]],
    )


# -- 5. signing ----------------------------------------------------------------------


def bench_signing(repeat: int, hit_seconds: float) -> None:
    body = np.random.default_rng(0).bytes(ONE_MB)
    key = key_from_text("benchmark")
    mac = sign(body, key)
    assert verify(mac, body, key)
    loops = 200
    timings = [
        ("sign (HMAC-SHA256, ours)", lambda: sign(body, key)),
        ("verify (HMAC-SHA256, ours)", lambda: verify(mac, body, key)),
        ("keyed blake2b (alternative)", lambda: hashlib.blake2b(body, key=key).digest()),
        ("xxh3-128 checksum (before signing)", lambda: xxhash.xxh3_128_digest(body)),
    ]
    rows = []
    for label, fn in timings:
        seconds = best_of(repeat, lambda: [fn() for _ in range(loops)]) / loops
        rows.append([label, f"{seconds * 1e6:.0f}", f"{ONE_MB / seconds / 1e9:.2f}",
                     f"{seconds / hit_seconds:.0%}"])
    table(
        "5. Signing and verifying 1 MB of entry body",
        ["method", "µs per MB", "GB/s", "share of a 1 MB hit"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--array-mb", type=int, default=256)
    args = parser.parse_args()

    print(f"crystallize {crystallize.__version__}, Python {platform.python_version()}, "
          f"numpy {np.__version__}, xxhash {xxhash.VERSION}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; best of {args.repeat}")
    cache_root = Path(tempfile.mkdtemp(prefix="crystallize-bench-"))
    try:
        bench_array(args.repeat, args.array_mb)
        bench_lists(args.repeat)
        hit = bench_hits(args.repeat, cache_root)
        bench_cold_warm(args.repeat, cache_root)
        bench_signing(args.repeat, hit)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)


if __name__ == "__main__":
    main()
