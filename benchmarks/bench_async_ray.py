"""Async runs on Ray overlap as under AsyncExecution: 50 runs of an async step sleeping 0.2 s.

    .venv/bin/python benchmarks/bench_async_ray.py [--runs 50] [--nap 0.2] [--repeat 3] [--skip-reference]

Rows (wall seconds for all runs, median of ``--repeat``; each row checked: every run
back, none failed):

  AsyncExecution()            every run an asyncio task in this process's loop: the floor.
  RayExecution() warm         on a local Ray (num_cpus=2) started and warmed before timing;
                              the runs share each worker's event loop (at most
                              ``max_concurrency`` per task). Goal: within 2x AsyncExecution.
  RayExecution(batch_size=1)  one run per task: each worker runs one coroutine at a time,
                              as before runs shared a loop.
  reference ray               crystallize-ml 0.27's Ray plugin (patched to run at all, see
                              _reference_runner.py): one Ray task per replicate, each
                              driving its own coroutine.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # an embedded Ray on loopback for this script only

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from crystallize import AsyncExecution, Experiment, Pipeline, pipeline_step

HERE = Path(__file__).resolve().parent
REFERENCE_PYTHON = Path("/work/refenv/bin/python")


@pipeline_step()
async def nap(data, *, seconds: float = 0.2):
    await asyncio.sleep(seconds)
    return data, {"napped": seconds}


def experiment(backend: object, seconds: float) -> Experiment:
    return Experiment(
        lambda ctx: ctx["replicate"],
        Pipeline([nap(seconds=seconds)]),
        plugins=[backend],
        name="naps",
        journal=False,
    )


def timed(backend: object, runs: int, seconds: float, repeat: int) -> float:
    exp = experiment(backend, seconds)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = exp.run(replicates=runs)
        times.append(time.perf_counter() - started)
        if result.errors or len(result.metrics.baseline.metrics["napped"]) != runs:
            raise SystemExit(f"{backend!r}: {len(result.errors)} failed runs: {result.errors[:1]}")
    return statistics.median(times)


def reference(runs: int) -> tuple[float | None, str]:
    if not REFERENCE_PYTHON.exists():
        return None, f"reference venv {REFERENCE_PYTHON} absent"
    command = [str(REFERENCE_PYTHON), str(HERE / "_reference_runner.py"), "--backend", "ray"]
    command += ["--runs", str(runs), "--workload", "nap", "--log-level", "WARNING"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return None, f"no result: {proc.stderr[-300:]}"
    payload = json.loads(lines[-1])
    if "error" in payload:
        return None, payload["error"][:200]
    seconds = payload.get("per_run_ms_excl_shutdown", payload["per_run_ms"]) * runs / 1000
    return seconds, "excluding the ray.shutdown() it does inside run()"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--nap", type=float, default=0.2, help="seconds each run's step sleeps")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    import ray

    from crystallize_ray import RayExecution

    rows: list[tuple[str, float | None, str]] = []
    floor = timed(AsyncExecution(), args.runs, args.nap, args.repeat)
    rows.append(("AsyncExecution()", floor, ""))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.get([ray.remote(lambda: None).remote() for _ in range(8)])  # workers up
    for label, backend in (
        ("RayExecution() warm", RayExecution()),
        ("RayExecution(batch_size=1) warm", RayExecution(batch_size=1)),
    ):
        timed(backend, args.runs, args.nap, 1)  # warm: the workers hold the experiment
        rows.append((label, timed(backend, args.runs, args.nap, args.repeat), ""))
    ray.shutdown()
    if not args.skip_reference:
        seconds, note = reference(args.runs)
        rows.append(("reference ray (crystallize-ml 0.27)", seconds, note))

    print(f"{args.runs} runs of an async step sleeping {args.nap} s, 2 CPUs; median of {args.repeat}")
    print(f"{'backend':<38}{'seconds':>9}{'x AsyncExecution':>18}  note")
    for label, seconds, note in rows:
        shown = f"{seconds:9.2f}{seconds / floor:17.1f}x" if seconds is not None else f"{'-':>9}{'-':>18}"
        print(f"{label:<38}{shown}  {note}")
    ours = rows[1][1] or float("inf")
    print(
        f"goal: RayExecution() within 2x AsyncExecution: {ours / floor:.2f}x -> {'met' if ours <= 2 * floor else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
