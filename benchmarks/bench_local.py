"""Per-run overhead of the local backends, against a bare loop and the reference package.

Usage::

    python benchmarks/bench_local.py [--runs 2000] [--repeat 3] [--numpy-runs 20]
                                     [--reference-python /work/refenv/bin/python]

A second table times numpy-heavy runs (repeated 400x400 matrix products) on the
process pool against serial, with native threads limited to each worker's CPU share
(the default) and unlimited (how the pool behaved before ``threads_per_worker``).

Workload (the same as ``benchmarks/_reference_runner.py``): a datasource returning a
small constant tuple and two trivial steps, one passing its input on and one returning
``(data, {"value": 1.0})``, so each run records exactly one metric value. The
experiment also carries an ``ArtifactPlugin`` (no artifacts are written) and a quiet
``LoggingPlugin``, as the reference probe's does (its ``log_level="WARNING"`` is a
threshold that silences its INFO lines; ours logs at INFO, which nothing shows here).

Each backend runs the N runs ``--repeat`` times with the run journal on (the default)
and, interleaved, with ``journal=False`` (like for like with the previous release,
which had no journal); the best times are reported, as seconds, milliseconds per run
with and without the journal, and the ratio to a bare Python loop calling the same
three functions N times. When a reference interpreter is given (default:
``/work/refenv/bin/python`` if it exists), ``_reference_runner.py`` is run with it for
the serial, thread and process backends (``--log-level WARNING --workers 2``, best of
``--repeat`` invocations) and its per-run time is printed beside ours with the ratio
reference / ours (> 1: ours is faster). The reference package is never imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _checked import METRIC, run_checked

from crystallize import (
    ArtifactPlugin,
    AsyncExecution,
    ExecutionBackend,
    Experiment,
    LoggingPlugin,
    ParallelExecution,
    Pipeline,
    SerialExecution,
    data_source,
    pipeline_step,
)

HERE = Path(__file__).resolve().parent
REFERENCE_RUNNER = HERE / "_reference_runner.py"
DEFAULT_REFERENCE_PYTHON = Path("/work/refenv/bin/python")
CONSTANT = (1, 2, 3)
WORKERS = 2


# Module level, so the process backend ships them as recipes.
@data_source
def constant_source(ctx):
    return CONSTANT


@pipeline_step()
def passthrough(data, ctx):
    return data


@pipeline_step()
def record_metric(data, ctx):
    return data, {METRIC: 1.0}


MATMUL_SIZE = 400
MATMUL_PRODUCTS = 40  # the same numbers as _reference_runner.py --workload matmul


@pipeline_step()
def matmul(data, ctx):
    """Numpy-heavy work: repeated 400x400 products (BLAS uses every thread it may)."""
    import numpy

    a = numpy.random.default_rng(0).random((MATMUL_SIZE, MATMUL_SIZE))
    for _ in range(MATMUL_PRODUCTS):
        a = a @ a
        a /= numpy.abs(a).max()
    return data


BACKENDS: dict[str, Callable[[], ExecutionBackend]] = {
    "serial": SerialExecution,
    "thread": lambda: ParallelExecution(max_workers=WORKERS, executor_type="thread"),
    "process": lambda: ParallelExecution(max_workers=WORKERS, executor_type="process"),
    "async": AsyncExecution,
}
LABELS = {
    "serial": "SerialExecution",
    "thread": f"Parallel thread x{WORKERS}",
    "process": f"Parallel process x{WORKERS}",
    "async": "AsyncExecution",
}
REFERENCE_BACKENDS = ("serial", "thread", "process")


def bare_loop(runs: int) -> float:
    """Seconds for a plain loop over the undecorated functions."""
    fetch = constant_source.__wrapped__
    step_a = passthrough.__wrapped__
    step_b = record_metric.__wrapped__
    collected = []
    started = time.perf_counter()
    for _ in range(runs):
        data = fetch(None)
        data = step_a(data, None)
        data, metrics = step_b(data, None)
        collected.append(metrics[METRIC])
    elapsed = time.perf_counter() - started
    assert len(collected) == runs
    return elapsed


def time_backend(name: str, runs: int, scratch: str, *, journal: bool = True) -> float:
    """Seconds for ``Experiment.run()`` of ``runs`` runs on one backend, checked.

    ``journal=True`` keeps the run journal on, as by default (in ``scratch``);
    ``False`` measures the run itself, as the previous release (which had no journal) did.
    """
    exp = Experiment(
        datasource=constant_source(),
        pipeline=Pipeline([passthrough(), record_metric()]),
        plugins=[BACKENDS[name](), ArtifactPlugin(root_dir=scratch), LoggingPlugin()],
        name="overhead_probe",
        replicates=runs,
        journal=os.path.join(scratch, "journals") if journal else False,
    )
    return run_checked(exp, runs)


NUMPY_BACKENDS: dict[str, Callable[[], ExecutionBackend]] = {
    "serial": SerialExecution,
    # Before threads_per_worker: each worker's BLAS used every CPU (oversubscribed).
    "process, BLAS threads = all CPUs": lambda: ParallelExecution(
        max_workers=WORKERS, executor_type="process", threads_per_worker=os.cpu_count() or 1
    ),
    "process (default: CPU share)": lambda: ParallelExecution(max_workers=WORKERS, executor_type="process"),
}


def time_numpy(name: str, runs: int, scratch: str) -> float:
    """Seconds for ``runs`` numpy-heavy runs on one backend, checked."""
    exp = Experiment(
        datasource=constant_source(),
        pipeline=Pipeline([matmul(), record_metric()]),
        plugins=[NUMPY_BACKENDS[name](), ArtifactPlugin(root_dir=scratch)],
        name="numpy_probe",
        replicates=runs,
    )
    return run_checked(exp, runs)


def numpy_table(runs: int, repeat: int, ref_python: Path | None) -> None:
    """Numpy-heavy runs: the process pool against serial (serial already uses all
    cores through BLAS), and the reference package's process pool."""
    try:
        import numpy  # noqa: F401  (imported before the pools fork, as a user's script would)
    except ImportError:
        print("\n(numpy not installed: numpy-heavy table skipped)")
        return
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="crystallize_bench_") as scratch:
        for name in NUMPY_BACKENDS:
            times[name] = min(time_numpy(name, runs, scratch) for _ in range(repeat))
    serial = times["serial"]
    print(
        f"\nnumpy-heavy runs: {runs} runs of {MATMUL_PRODUCTS} products of {MATMUL_SIZE}x{MATMUL_SIZE}, "
        f"best of {repeat}; speed relative to serial (> 1: faster than serial)"
    )
    header = f"{'backend':<40}{'seconds':>10}{'x serial speed':>16}"
    print(header)
    print("-" * len(header))
    for name, seconds in times.items():
        print(f"{name:<40}{seconds:>10.3f}{serial / seconds:>16.2f}")
    if ref_python is not None:
        ref = reference(ref_python, "process", runs, repeat, workload="matmul")
        if "error" in ref:
            print(f"{'reference process (crystallize-ml)':<40}{'error':>10}  {ref['error']}")
        else:
            print(f"{'reference process (crystallize-ml)':<40}{ref['seconds']:>10.3f}{serial / ref['seconds']:>16.2f}")


def reference(python: Path, backend: str, runs: int, repeat: int, workload: str = "noop") -> dict:
    """Best of ``repeat`` invocations of the reference probe; ``{"error": ...}`` on failure."""
    best: dict | None = None
    for _ in range(repeat):
        proc = subprocess.run(
            [
                str(python),
                str(REFERENCE_RUNNER),
                "--backend",
                backend,
                "--runs",
                str(runs),
                "--log-level",
                "WARNING",
                "--workers",
                str(WORKERS),
                "--workload",
                workload,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tempfile.gettempdir(),
        )
        lines = proc.stdout.strip().splitlines()
        try:
            payload = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            return {"error": f"exit {proc.returncode}: {tail[0]}"}
        if "error" in payload:
            return payload
        if best is None or payload["per_run_ms"] < best["per_run_ms"]:
            best = payload
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many (default 3)")
    parser.add_argument(
        "--reference-python",
        type=Path,
        default=DEFAULT_REFERENCE_PYTHON if DEFAULT_REFERENCE_PYTHON.exists() else None,
        help=f"interpreter of the reference package's environment (default: {DEFAULT_REFERENCE_PYTHON} if it exists)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference package")
    parser.add_argument(
        "--numpy-runs", type=int, default=20, help="runs of the numpy-heavy table (0 skips it; default 20)"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeat < 1:
        parser.error("--runs and --repeat must be >= 1")
    ref_python = None if args.no_reference else args.reference_python

    runs, repeat = args.runs, args.repeat
    print(
        f"crystallize local backends: {runs} no-op runs, best of {repeat}; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {WORKERS} workers for pools"
    )

    base = min(bare_loop(runs) for _ in range(repeat))
    ours: dict[str, float] = {}
    unjournaled: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="crystallize_bench_") as scratch:
        for name in BACKENDS:
            on, off = [], []
            for _ in range(repeat):  # interleaved, so both see the same machine
                on.append(time_backend(name, runs, scratch))
                off.append(time_backend(name, runs, scratch, journal=False))
            ours[name], unjournaled[name] = min(on), min(off)

    refs: dict[str, dict] = {}
    ref_version = None
    if ref_python is not None:
        for name in REFERENCE_BACKENDS:
            refs[name] = reference(ref_python, name, runs, repeat)
            ref_version = ref_version or refs[name].get("version")

    def ms(seconds: float) -> float:
        return seconds * 1000.0 / runs

    header = f"{'backend':<22}{'seconds':>10}{'per-run ms':>12}{'no journal':>12}{'x bare loop':>13}"
    if refs:
        header += f"{'reference ms':>14}{'ref / ours':>12}"
    print()
    print(header)
    print("-" * len(header))
    print(f"{'bare Python loop':<22}{base:>10.4f}{ms(base):>12.5f}{'':>12}{1.0:>13.1f}")
    for name, seconds in ours.items():
        line = (
            f"{LABELS[name]:<22}{seconds:>10.4f}{ms(seconds):>12.4f}{ms(unjournaled[name]):>12.4f}"
            f"{seconds / base:>13.1f}"
        )
        if refs:
            ref = refs.get(name)
            if ref is None:
                line += f"{'-':>14}{'-':>12}"
            elif "error" in ref:
                line += f"{'error':>14}{'-':>12}"
            else:
                line += f"{ref['per_run_ms']:>14.4f}{ref['per_run_ms'] / ms(seconds):>12.1f}"
        print(line)
    if refs:
        print()
        print(
            f"reference: crystallize-ml {ref_version or '?'} via {ref_python} "
            f"(_reference_runner.py --log-level WARNING --workers {WORKERS}); it has no async backend"
        )
        for name, ref in refs.items():
            if "error" in ref:
                print(f"reference {name} failed: {ref['error']}")
    elif ref_python is None and not args.no_reference:
        print(f"\n(no reference interpreter: pass --reference-python; {DEFAULT_REFERENCE_PYTHON} not found)")
    if args.numpy_runs:
        numpy_table(args.numpy_runs, repeat, ref_python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
