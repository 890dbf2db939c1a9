"""Concurrent writers: eight real processes storing the same cache key at once.

Single flight is turned off here (``CRYSTALLIZE_CACHE_MAX_WAIT=0``: no run waits for
another), so the writers really race; with it on they compute once (see
``tests/test_shared_cache_flight.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from crystallize import FrozenContext, Pipeline
from crystallize.explain import RECORD_KEY

WRITERS = 8

STEP_MODULE = """\
import os
import time

from crystallize import pipeline_step


@pipeline_step(cacheable=True)
def slow_square(data):
    with open(os.environ["COUNTER_FILE"], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    # Long enough that every writer misses before the first one stores.
    time.sleep(0.5)
    return {"squares": [x * x for x in data], "blob": bytes(range(256)) * 4096}
"""

WORKER = """\
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from crystallize import FrozenContext, Pipeline
import concurrent_steps

gate = Path(os.environ["GATE"])
Path(os.environ["READY_DIR"], str(os.getpid())).touch()
while not gate.exists():
    time.sleep(0.002)
ctx = FrozenContext()
out = Pipeline([concurrent_steps.slow_square()]).run(list(range(1000)), ctx)
record = ctx.provenance[0]
print(json.dumps({"cache": record.cache, "step_hash": record.step_hash,
                  "input_hash": record.input_hash, "head": out["squares"][:4],
                  "blob": len(out["blob"])}))
"""


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_concurrent_writers_of_one_key_leave_one_valid_entry(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "concurrent_steps.py").write_text(STEP_MODULE)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ready = tmp_path / "ready"
    ready.mkdir()
    cache_dir = tmp_path / "cache"
    counter = tmp_path / "calls.txt"
    gate = tmp_path / "gate"
    env = dict(
        os.environ,
        CRYSTALLIZE_CACHE_DIR=str(cache_dir),
        COUNTER_FILE=str(counter),
        GATE=str(gate),
        READY_DIR=str(ready),
        CRYSTALLIZE_CACHE_MAX_WAIT="0",
    )

    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(src)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(WRITERS)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(ready.iterdir())) < WRITERS:
            assert time.monotonic() < deadline, "workers did not start"
            exited = [p for p in procs if p.poll() is not None]
            assert not exited, exited[0].communicate()[1]
            time.sleep(0.01)
        gate.touch()  # release all writers at once
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    results = []
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))

    assert all(r["head"] == [0, 1, 4, 9] and r["blob"] == 256 * 4096 for r in results)
    assert {r["cache"] for r in results} <= {"miss", "hit"}
    # The gate released them together, so they raced: several computed and stored.
    assert _count(counter) >= 2
    assert sum(r["cache"] == "miss" for r in results) == _count(counter)

    ((step_hash, input_hash),) = {(r["step_hash"], r["input_hash"]) for r in results}
    # Besides the entry (a manifest, and its 1 MB output in one blob) only the step's
    # key record, which explains later misses: no variants, no .tmp, no lease left.
    files = sorted(p for p in cache_dir.rglob("*") if p.is_file() and p.name != f"{RECORD_KEY}.pkl")
    manifest = cache_dir / step_hash / f"{input_hash}.pkl"
    assert [p for p in files if p.parent.name != "blobs"] == [manifest]
    (blob,) = [p for p in files if p.parent.name == "blobs"]
    assert blob.stat().st_size > 1 << 20 > manifest.stat().st_size

    # The surviving entry is whole: this process hits it without running the step.
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.setenv("CRYSTALLIZE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("COUNTER_FILE", str(counter))
    import concurrent_steps

    try:
        calls_before = _count(counter)
        ctx = FrozenContext()
        out = Pipeline([concurrent_steps.slow_square()]).run(list(range(1000)), ctx)
    finally:
        del sys.modules["concurrent_steps"]
    assert ctx.provenance[0].cache == "hit"
    assert out["squares"] == [x * x for x in range(1000)]
    assert _count(counter) == calls_before
