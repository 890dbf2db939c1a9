"""What RayExecution costs per run, side by side with raw Ray, a process pool and the reference.

    .venv/bin/python benchmarks/bench_ray.py [--runs 2000] [--repeat 5] [--skip-reference]

Every row runs the same no-op workload: N runs of an experiment whose datasource
returns a small constant and whose single step returns its input and records one
metric (``value``). Each row is checked afterwards (N metric values, no failed
runs), so a backend cannot look fast by failing quickly. Timed rows are warm: the
worker pool has started and the experiment has been run once before timing.

Rows, in the order they run:

  parallel[process] x2    ParallelExecution(max_workers=2, executor_type="process"),
                          measured first, before Ray exists in this process, so the
                          pool forks from a driver with no Ray threads in it.
  reference ray (...)     crystallize-ml 0.27's RayExecution (one Ray task per
                          replicate), run by benchmarks/_reference_runner.py in
                          /work/refenv. Its plugin shuts Ray down inside
                          ``Experiment.run()``; the runner reports the time with
                          and without that shutdown, and both are shown. The
                          reference's workload has two trivial steps, ours one.
  raw ray tasks           N ``@ray.remote`` no-op tasks submitted at once, then one
                          ``ray.get`` of all: the floor for "one task per run".
  raw ray, streamed (16)  the same no-op tasks, but at most 16 outstanding, reaped
                          with ``ray.wait`` as they finish: what RayExecution does
                          (bounded in-flight window, results streamed). Shown so
                          the cost of streaming is told apart from crystallize's.
                          (16 = RayExecution's default window, max(16, 4 x CPUs).)
  RayExecution(batch=1)   one Ray task per run, like raw Ray plus what crystallize
                          adds (bounded in-flight window, context, metrics, result
                          records). Goal: <= 1.2x raw Ray per task.
  RayExecution() adaptive the default: adaptive batching groups tiny runs so a
                          task takes ~50 ms. Goal: well under 1x raw Ray per task
                          (reported as met below 0.5x).
  cpu-bound, Ray 1/2 CPUs 16 runs of ~0.25 s of pure-Python arithmetic each, with
                          RayExecution() on an embedded Ray started with
                          num_cpus=1, then num_cpus=2, each in its own subprocess
                          (a driver has one Ray). Their ratio is 1 / speed-up.

The raw, streamed and RayExecution rows share one
``ray.init(address="local", num_cpus=2, include_dashboard=False)``, warmed with
50 no-op tasks; RayExecution finds Ray initialised, uses it and leaves it running,
so their timings contain no Ray start-up or shutdown.

Reading the table: "per-run ms" is wall time / runs (for the CPU-bound rows the
"seconds" column is what matters). "ratio" is per-run ms divided by the per-run
ms of the row named in "vs": below 1 is faster than that row. Timings are the
median of ``--repeat`` timed runs. On a 2-core machine the driver competes with
the two Ray workers for CPU, so per-task costs here are pessimistic.
"""

from __future__ import annotations

import os

# The embedded Ray lives on loopback for the length of this script; Ray 2.60's
# token authentication would only print a warning here.
os.environ["RAY_AUTH_MODE"] = "disabled"

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _checked import METRIC, run_checked

from crystallize import Experiment, ParallelExecution, Pipeline, pipeline_step

HERE = Path(__file__).resolve().parent
REFERENCE_PYTHON = Path("/work/refenv/bin/python")
REFERENCE_RUNNER = HERE / "_reference_runner.py"
WARM_TASKS = 50
CPU_RUNS = 16
CPU_SECONDS = 0.25


# -- the workload -------------------------------------------------------------
@pipeline_step()
def record(data):
    return data, {METRIC: 1.0}


def spin(iterations: int) -> int:
    """Pure-Python arithmetic: holds the GIL, so only processes run it in parallel."""
    total = 0
    for i in range(iterations):
        total = (total + i * i) % 1_000_003
    return total


@pipeline_step()
def crunch(data, *, iterations: int):
    return data, {METRIC: float(spin(iterations))}


def constant(ctx):
    return (1, 2, 3)


def noop_experiment(backend: object) -> Experiment:
    return Experiment(
        datasource=constant, pipeline=Pipeline([record()]), plugins=[backend], cache=False, name="bench_noop"
    )


def median_of(repeat: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeat))


# -- rows ---------------------------------------------------------------------
@dataclass
class Row:
    name: str
    runs: int
    seconds: float
    ratio: float | None = None
    vs: str = ""

    @property
    def per_run_ms(self) -> float:
        return self.seconds * 1000.0 / self.runs


def bench_parallel(runs: int, repeat: int) -> Row:
    exp = noop_experiment(ParallelExecution(max_workers=2, executor_type="process"))
    run_checked(exp, runs)  # warm: imports, page cache
    return Row("parallel[process] x2", runs, median_of(repeat, lambda: run_checked(exp, runs)))


def bench_reference(runs: int) -> tuple[dict | None, str]:
    """The reference's RayExecution in its own venv; (its JSON, or None and why)."""
    if not REFERENCE_PYTHON.exists():
        return None, f"skipped: {REFERENCE_PYTHON} does not exist (the reference venv is not installed)"
    cmd = [
        str(REFERENCE_PYTHON),
        str(REFERENCE_RUNNER),
        "--backend",
        "ray",
        "--runs",
        str(runs),
        "--log-level",
        "WARNING",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return None, "skipped: the reference runner took over 180 s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return None, f"failed: exit {proc.returncode}, no JSON; stderr tail: {proc.stderr[-500:]!r}"
    payload = json.loads(lines[-1])
    if "error" in payload:
        return None, f"failed: {payload['error']}"
    return payload, ""


def bench_raw_ray(ray, runs: int, repeat: int) -> float:
    noop = ray.remote(_noop)

    def once() -> float:
        started = time.perf_counter()
        ray.get([noop.remote() for _ in range(runs)])
        return time.perf_counter() - started

    once()
    return median_of(repeat, once)


def bench_raw_ray_streamed(ray, runs: int, repeat: int, limit: int) -> float:
    noop = ray.remote(_noop)

    def once() -> float:
        started = time.perf_counter()
        running: set = set()
        left = runs
        while left or running:
            while left and len(running) < limit:
                running.add(noop.remote())
                left -= 1
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                running.discard(ref)
                ray.get(ref)
        return time.perf_counter() - started

    once()
    return median_of(repeat, once)


def bench_ray_execution(runs: int, repeat: int, **options) -> float:
    from crystallize_ray import RayExecution

    exp = noop_experiment(RayExecution(**options))
    run_checked(exp, runs)  # warm: workers load the pipeline code once
    return median_of(repeat, lambda: run_checked(exp, runs))


def _noop() -> None:
    return None


def calibrate_iterations(seconds: float) -> int:
    """Loop iterations of ``crunch`` that take about ``seconds`` on this machine."""
    probe = 200_000
    elapsed = min(_timed(spin, probe) for _ in range(3))
    return max(1, int(probe * seconds / elapsed))


def _timed(fn: Callable[[int], object], arg: int) -> float:
    started = time.perf_counter()
    fn(arg)
    return time.perf_counter() - started


def bench_cpu_bound_subprocess(num_cpus: int, iterations: int, repeat: int) -> float:
    """Wall seconds of the CPU-bound experiment on a fresh Ray with ``num_cpus`` (median)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--cpu-bound-child",
        str(num_cpus),
        "--iterations",
        str(iterations),
        "--repeat",
        str(repeat),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"cpu-bound child (num_cpus={num_cpus}) failed, exit {proc.returncode}: {proc.stderr[-1500:]}"
        )
    return json.loads(lines[-1])["seconds"]


def cpu_bound_child(num_cpus: int, iterations: int, repeat: int) -> None:
    """Inside the subprocess: start Ray with ``num_cpus``, time CPU_RUNS crunch runs."""
    import ray

    from crystallize_ray import RayExecution

    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    try:
        noop = ray.remote(_noop)
        ray.get([noop.remote() for _ in range(WARM_TASKS)])
        exp = Experiment(
            datasource=constant,
            pipeline=Pipeline([crunch(iterations=iterations)]),
            plugins=[RayExecution()],
            cache=False,
            name="bench_cpu",
        )
        run_checked(exp, num_cpus)  # warm: every worker loads the pipeline
        seconds = median_of(repeat, lambda: run_checked(exp, CPU_RUNS))
    finally:
        ray.shutdown()
    print(json.dumps({"num_cpus": num_cpus, "runs": CPU_RUNS, "seconds": seconds}))


# -- report -------------------------------------------------------------------
def print_table(rows: list[Row]) -> None:
    header = f"{'name':<26} {'runs':>6} {'seconds':>9} {'per-run ms':>11} {'ratio':>7}  vs"
    print(header)
    print("-" * (len(header) + 22))
    for row in rows:
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        print(f"{row.name:<26} {row.runs:>6} {row.seconds:>9.3f} {row.per_run_ms:>11.4f} {ratio:>7}  {row.vs}")


def goal(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per no-op row (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions per row; the median is shown")
    parser.add_argument("--skip-reference", action="store_true", help="do not run the reference package")
    parser.add_argument("--cpu-bound-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_bound_child is not None:
        cpu_bound_child(args.cpu_bound_child, args.iterations, args.repeat)
        return 0
    if args.runs < 1 or args.repeat < 1:
        parser.error("--runs and --repeat must be >= 1")
    runs, repeat = args.runs, args.repeat
    total_started = time.perf_counter()
    print(
        f"bench_ray: {runs} no-op runs per row, median of {repeat}; python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs\n"
    )

    # 4. The process pool first: no Ray threads exist yet when it forks.
    parallel = bench_parallel(runs, repeat)
    print(f"[4] ParallelExecution(max_workers=2, 'process'): {parallel.per_run_ms:.4f} ms/run")

    # 5. The reference, before our Ray starts, so the two never share the CPUs.
    reference, why = (None, "skipped: --skip-reference") if args.skip_reference else bench_reference(runs)
    if reference:
        print(
            f"[5] reference crystallize-ml {reference['version']} RayExecution: "
            f"{reference['per_run_ms']:.4f} ms/run with its ray.shutdown(), "
            f"{reference.get('per_run_ms_excl_shutdown', float('nan')):.4f} ms/run without "
            f"(shutdown {reference.get('ray_shutdown_seconds', float('nan')):.2f} s)"
        )
    else:
        print(f"[5] reference RayExecution {why}")

    # 1-3 on one warm embedded Ray.
    import ray

    # address="local": always a fresh Ray of our own. Without it ray.init() joins any
    # Ray already running on this machine (a `ray start`, another test's cluster).
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        noop = ray.remote(_noop)
        ray.get([noop.remote() for _ in range(WARM_TASKS)])
        raw = Row("raw ray tasks", runs, bench_raw_ray(ray, runs, repeat), 1.0, "raw ray tasks")
        print(f"[1] raw Ray: {raw.per_run_ms:.4f} ms/task")
        window = max(16, 4 * int(ray.cluster_resources().get("CPU", 1)))  # RayExecution's default
        streamed = Row(
            f"raw ray, streamed ({window})", runs, bench_raw_ray_streamed(ray, runs, repeat, window), vs="raw ray tasks"
        )
        streamed.ratio = streamed.per_run_ms / raw.per_run_ms
        print(
            f"    raw Ray streamed, {window} in flight: {streamed.per_run_ms:.4f} ms/task, "
            f"{streamed.ratio:.2f}x raw Ray"
        )
        single = Row("RayExecution(batch=1)", runs, bench_ray_execution(runs, repeat, batch_size=1))
        single.ratio, single.vs = single.per_run_ms / raw.per_run_ms, "raw ray tasks"
        print(
            f"[2] RayExecution(batch_size=1): {single.per_run_ms:.4f} ms/run, "
            f"{single.ratio:.2f}x raw Ray (goal <= 1.2x: {goal(single.ratio <= 1.2)}), "
            f"{single.per_run_ms / streamed.per_run_ms:.2f}x raw Ray streamed"
        )
        adaptive = Row("RayExecution() adaptive", runs, bench_ray_execution(runs, repeat))
        adaptive.ratio, adaptive.vs = adaptive.per_run_ms / raw.per_run_ms, "raw ray tasks"
        print(
            f"[3] RayExecution() adaptive: {adaptive.per_run_ms:.4f} ms/run, "
            f"{adaptive.ratio:.2f}x raw Ray per task (goal well under 1: {goal(adaptive.ratio < 0.5)})"
        )
    finally:
        ray.shutdown()
    parallel.ratio, parallel.vs = parallel.per_run_ms / adaptive.per_run_ms, "RayExecution() adaptive"
    print(f"[4] ParallelExecution process pool: {parallel.ratio:.2f}x RayExecution() per run")

    rows = [raw, streamed, single, adaptive, parallel]
    if reference:
        ref_seconds = reference["seconds"]
        excl_ms = reference.get("per_run_ms_excl_shutdown")
        rows.append(
            Row(
                "reference ray (+shutdown)",
                runs,
                ref_seconds,
                reference["per_run_ms"] / adaptive.per_run_ms,
                "RayExecution() adaptive",
            )
        )
        if excl_ms is not None:
            rows.append(
                Row(
                    "reference ray (no shutdn)",
                    runs,
                    excl_ms * runs / 1000.0,
                    excl_ms / adaptive.per_run_ms,
                    "RayExecution() adaptive",
                )
            )
            print(
                f"[5] reference / ours: {excl_ms / adaptive.per_run_ms:.2f}x vs RayExecution(), "
                f"{excl_ms / single.per_run_ms:.2f}x vs RayExecution(batch_size=1) "
                f"(both without the reference's shutdown; ours never shuts down here)"
            )

    # 6. CPU-bound speed-up, one fresh Ray per subprocess.
    iterations = calibrate_iterations(CPU_SECONDS)
    one = Row(
        "cpu-bound, Ray 1 CPU", CPU_RUNS, bench_cpu_bound_subprocess(1, iterations, repeat), 1.0, "cpu-bound, Ray 1 CPU"
    )
    two = Row(
        "cpu-bound, Ray 2 CPUs", CPU_RUNS, bench_cpu_bound_subprocess(2, iterations, repeat), vs="cpu-bound, Ray 1 CPU"
    )
    two.ratio = two.seconds / one.seconds
    print(
        f"[6] {CPU_RUNS} runs x ~{CPU_SECONDS} s ({iterations} iterations): 1 CPU {one.seconds:.2f} s, "
        f"2 CPUs {two.seconds:.2f} s, speed-up {one.seconds / two.seconds:.2f}x (ideal 2.00x)"
    )
    rows += [one, two]

    print()
    print_table(rows)
    print(f"\ntotal wall time {time.perf_counter() - total_started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
