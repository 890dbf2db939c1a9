"""Overhead probe for the *reference* implementation (``crystallize-ml`` on PyPI).

This script is ours.  It only calls the public API of the reference package
and must be executed with the interpreter of the separate reference
virtualenv, never with this project's environment::

    /work/refenv/bin/python benchmarks/_reference_runner.py --backend serial --runs 2000
    /work/refenv/bin/python benchmarks/_reference_runner.py --backend thread --runs 2000
    /work/refenv/bin/python benchmarks/_reference_runner.py --backend process --runs 2000
    /work/refenv/bin/python benchmarks/_reference_runner.py --backend ray --runs 500
    /work/refenv/bin/python benchmarks/_reference_runner.py --baseline-loop --runs 2000

It prints exactly one JSON object on stdout (everything else -- the
reference's INFO log lines, Ray's chatter -- goes to stderr), e.g.::

    {"backend": "thread", "runs": 2000, "seconds": 1.23, "per_run_ms": 0.61,
     "version": "0.27.0", ...}

On failure the object has an ``"error"`` key instead of timings and the exit
status is 1.

Workload: a datasource that returns a small constant and two trivial steps,
one returning its input unchanged and one returning ``(data, {"value": 1.0})``
so that exactly one metric value is recorded per replicate.  The run is
checked afterwards (N metric values, no per-replicate errors), because the
reference swallows per-replicate exceptions into ``result.errors`` and would
otherwise "succeed" very quickly.

Ray backend and the runtime patch
---------------------------------
``crystallize_extras.ray_plugin.RayExecution`` (crystallize-extras 0.7.3) does
not work against a real Ray as shipped.  ``Experiment.arun`` hands every
execution plugin other than ``ParallelExecution`` an ``async def
replicate_fn``.  ``RayExecution.run_experiment_loop`` wraps that callable in a
*synchronous* ``@ray.remote`` function whose body is just
``return replicate_fn(rep)``.  Inside the Ray worker that call merely creates
a coroutine object -- nothing awaits it -- and Ray then has to serialise the
task's return value with cloudpickle, which raises
``TypeError: cannot pickle 'coroutine' object`` (surfacing in the driver as
``RayTaskError(TypeError)`` from ``ray.get``; the workers also warn
"coroutine ... was never awaited").  Shipping the closure (and the
Experiment it captures) to the workers is not the problem.

The patch (``_patch_ray_execution`` below, applied at runtime only, nothing in
site-packages is edited) wraps ``RayExecution.run_experiment_loop``: when the
callable it receives is a coroutine function, it is replaced by a plain
function that drives the coroutine to completion with ``asyncio.run`` inside
the worker; then the original method runs unchanged.  Pass
``--no-ray-patch`` to observe the unpatched failure.

Other Ray notes: Ray is started here, before the Experiment is built, with
``ray.init(num_cpus=2)`` (an embedded local instance), so the plugin's
``init_hook`` (which would otherwise call ``ray.init(address="auto")`` and need
a running cluster) is a no-op.  The plugin's ``after_run`` calls
``ray.shutdown()``; that happens inside ``Experiment.run`` and is therefore
inside the timed region -- it is reported separately as
``ray_shutdown_seconds`` together with ``per_run_ms_excl_shutdown``.  Worker
processes are pre-started with a few trivial tasks before timing (disable with
``--no-ray-warmup``).  Ray puts the driver's script directory and current
directory on its workers' ``sys.path``; this script therefore changes into a
scratch directory first, and checks from inside a worker that it imports the
reference package, not this repository's ``crystallize``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

# --------------------------------------------------------------------------- #
# Make sure `import crystallize` resolves to the reference package installed
# in this interpreter's environment and never to this repository's package.
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_HERE)


def _shadows_reference(entry: str) -> bool:
    path = os.path.abspath(entry or os.getcwd())
    if path.startswith(os.path.abspath(sys.prefix) + os.sep):
        return False
    return os.path.isdir(os.path.join(path, "crystallize")) or path == _REPO_ROOT


sys.path[:] = [p for p in sys.path if not _shadows_reference(p)]

# Scratch directory: the reference writes artifact metadata under its
# ArtifactPlugin root, and Ray exports the cwd to its workers' sys.path.
_SCRATCH = tempfile.mkdtemp(prefix="crystallize_ref_bench_")
os.chdir(_SCRATCH)

_RESULT_FD = os.dup(1)  # the real stdout, reserved for the single JSON line
os.dup2(2, 1)  # anything else printed to stdout (by us or libraries) -> stderr
sys.stdout = sys.stderr


def _emit(payload: dict) -> None:
    os.write(_RESULT_FD, (json.dumps(payload) + "\n").encode())


def _reference_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crystallize-ml")
    except PackageNotFoundError:
        return "unknown"


try:
    import crystallize as _ref  # noqa: E402
    from crystallize import (  # noqa: E402
        ArtifactPlugin,
        Experiment,
        LoggingPlugin,
        ParallelExecution,
        Pipeline,
        SerialExecution,
        data_source,
        pipeline_step,
    )
except Exception as exc:  # pragma: no cover - wrong interpreter
    _emit({"error": f"cannot import reference crystallize: {exc!r}", "python": sys.executable})
    sys.exit(1)

if not os.path.abspath(_ref.__file__).startswith(os.path.abspath(sys.prefix) + os.sep):
    _emit(
        {
            "error": "imported crystallize is not the reference install",
            "crystallize_file": _ref.__file__,
            "python": sys.executable,
        }
    )
    sys.exit(1)

VERSION = _reference_version()
METRIC = "value"
CONSTANT = (1, 2, 3)


# --------------------------------------------------------------------------- #
# Workload.  Module-level so that both pickle (process pool, fork) and
# cloudpickle (Ray) can ship it.  The undecorated callables are reachable via
# ``__wrapped__`` (the reference decorators use functools.update_wrapper),
# which the bare-loop baseline uses so both measure the very same functions.


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
MATMUL_PRODUCTS = 40


@pipeline_step()
def matmul(data, ctx):
    # The numpy-heavy workload of bench_local.py: repeated 400x400 products.
    import numpy

    a = numpy.random.default_rng(0).random((MATMUL_SIZE, MATMUL_SIZE))
    for _ in range(MATMUL_PRODUCTS):
        a = a @ a
        a /= numpy.abs(a).max()
    return data


NAP_SECONDS = 0.2


@pipeline_step()
async def nap(data, ctx):
    # bench_async_ray.py's workload: a step that only waits.
    import asyncio

    await asyncio.sleep(NAP_SECONDS)
    return data


def _build_experiment(plugins: list, runs: int, log_level: str | None, workload: str = "noop") -> Experiment:
    plugins = list(plugins)
    plugins.append(ArtifactPlugin(root_dir=os.path.join(_SCRATCH, "data")))
    if log_level is not None:
        plugins.append(LoggingPlugin(log_level=log_level))
    first = {"matmul": matmul, "nap": nap}.get(workload, passthrough)()
    return Experiment(
        datasource=constant_source(),
        pipeline=Pipeline([first, record_metric()]),
        plugins=plugins,
        name="reference_overhead_probe",
        replicates=runs,
    )


def _check_result(result, runs: int) -> str | None:
    if result.errors:
        first_key = next(iter(result.errors))
        return f"{len(result.errors)} replicate errors, first {first_key}: {result.errors[first_key]!r}"
    values = result.metrics.baseline.metrics.get(METRIC, [])
    if len(values) != runs:
        return f"expected {runs} metric values, got {len(values)}"
    return None


# --------------------------------------------------------------------------- #
# Ray support


def _patch_ray_execution(ray_execution_cls) -> None:
    """Runtime fix for RayExecution; see the module docstring."""
    import asyncio
    import inspect

    original = ray_execution_cls.run_experiment_loop
    if getattr(original, "_bench_patched", False):
        return

    def run_experiment_loop(self, experiment, replicate_fn):
        if inspect.iscoroutinefunction(replicate_fn):
            coroutine_fn = replicate_fn

            def replicate_fn(rep):
                return asyncio.run(coroutine_fn(rep))

        return original(self, experiment, replicate_fn)

    run_experiment_loop._bench_patched = True
    ray_execution_cls.run_experiment_loop = run_experiment_loop


def _ray_worker_origin() -> str:
    import crystallize

    return crystallize.__file__


def _run_ray(args, info: dict):
    import ray
    from crystallize_extras.ray_plugin import RayExecution

    info["ray_version"] = ray.__version__
    info["ray_patched"] = not args.no_ray_patch
    if not args.no_ray_patch:
        _patch_ray_execution(RayExecution)

    shutdown_seconds = []
    original_after_run = RayExecution.after_run

    def timed_after_run(self, experiment, result):  # timing only, same behaviour
        t0 = time.perf_counter()
        try:
            return original_after_run(self, experiment, result)
        finally:
            shutdown_seconds.append(time.perf_counter() - t0)

    RayExecution.after_run = timed_after_run

    t0 = time.perf_counter()
    ray.init(
        num_cpus=args.ray_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    info["ray_init_seconds"] = round(time.perf_counter() - t0, 4)
    try:
        origin = ray.get(ray.remote(_ray_worker_origin).remote())
        if not os.path.abspath(origin).startswith(os.path.abspath(sys.prefix) + os.sep):
            raise RuntimeError(f"Ray worker imported crystallize from {origin}")
        if not args.no_ray_warmup:
            t0 = time.perf_counter()
            warm = ray.remote(_ray_worker_origin)
            ray.get([warm.remote() for _ in range(4 * args.ray_cpus)])
            info["ray_warmup_seconds"] = round(time.perf_counter() - t0, 4)

        exp = _build_experiment([RayExecution()], args.runs, args.log_level, args.workload)
        t0 = time.perf_counter()
        result = exp.run()
        elapsed = time.perf_counter() - t0
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if shutdown_seconds:
        info["ray_shutdown_seconds"] = round(shutdown_seconds[0], 4)
        info["per_run_ms_excl_shutdown"] = round((elapsed - shutdown_seconds[0]) * 1000.0 / args.runs, 4)
    return result, elapsed


# --------------------------------------------------------------------------- #


def _run_backend(args) -> dict:
    info: dict = {}
    if args.backend == "ray":
        result, elapsed = _run_ray(args, info)
    else:
        if args.backend == "serial":
            plugins = [SerialExecution()]
        else:
            plugins = [ParallelExecution(executor_type=args.backend, max_workers=args.workers)]
            info["max_workers"] = args.workers or (
                max(1, (os.cpu_count() or 2) - 1) if args.backend == "process" else (os.cpu_count() or 8)
            )
        exp = _build_experiment(plugins, args.runs, args.log_level, args.workload)
        t0 = time.perf_counter()
        result = exp.run()
        elapsed = time.perf_counter() - t0
    problem = _check_result(result, args.runs)
    if problem:
        raise RuntimeError(problem)
    return {
        "backend": args.backend,
        "workload": args.workload,
        "runs": args.runs,
        "seconds": round(elapsed, 4),
        "per_run_ms": round(elapsed * 1000.0 / args.runs, 4),
        "version": VERSION,
        **info,
    }


def _baseline_loop(runs: int) -> dict:
    fetch = constant_source.__wrapped__
    step_a = passthrough.__wrapped__
    step_b = record_metric.__wrapped__
    collected = []
    t0 = time.perf_counter()
    for _ in range(runs):
        data = fetch(None)
        data = step_a(data, None)
        data, metrics = step_b(data, None)
        collected.append(metrics[METRIC])
    elapsed = time.perf_counter() - t0
    assert len(collected) == runs
    return {
        "backend": "baseline-loop",
        "runs": runs,
        "seconds": round(elapsed, 6),
        "per_run_ms": round(elapsed * 1000.0 / runs, 6),
        "version": VERSION,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["serial", "thread", "process", "ray"])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument(
        "--baseline-loop",
        action="store_true",
        help="time a bare loop over the same functions; combined with --backend, "
        "adds baseline_per_run_ms and ratio_vs_baseline to that backend's line",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="ParallelExecution max_workers (default: the reference's own default, "
        "cpu_count-1 for process and cpu_count for thread)",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        help="pass LoggingPlugin(log_level=...); default: the reference's default "
        "LoggingPlugin (INFO, which logs one line per replicate to stderr)",
    )
    parser.add_argument(
        "--workload",
        choices=["noop", "matmul", "nap"],
        default="noop",
        help="noop (default), matmul (repeated 400x400 products per run) or nap (an async step sleeping 0.2 s)",
    )
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--no-ray-patch", action="store_true")
    parser.add_argument("--no-ray-warmup", action="store_true")
    args = parser.parse_args(argv)
    if args.backend is None and not args.baseline_loop:
        parser.error("give --backend and/or --baseline-loop")
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    if args.backend is None:
        _emit(_baseline_loop(args.runs))
        return 0
    try:
        payload = _run_backend(args)
    except BaseException as exc:  # report, never hang or print a traceback to stdout
        if isinstance(exc, KeyboardInterrupt):
            raise
        cause = getattr(exc, "cause", None)  # RayTaskError carries the worker-side exception
        if isinstance(cause, BaseException):
            message = f"{type(exc).__name__} from worker: {type(cause).__name__}: {cause}"
        else:
            message = f"{type(exc).__name__}: {exc}"
        message = re.sub(r"\x1b\[[0-9;]*m", "", message)
        _emit({"backend": args.backend, "runs": args.runs, "version": VERSION, "error": message[:2000]})
        return 1
    if args.baseline_loop:
        base = _baseline_loop(2000)
        payload["baseline_per_run_ms"] = base["per_run_ms"]
        payload["ratio_vs_baseline"] = round(payload["per_run_ms"] / base["per_run_ms"], 1)
    _emit(payload)
    return 0


if __name__ == "__main__":
    code = main()
    import shutil

    shutil.rmtree(_SCRATCH, ignore_errors=True)
    sys.exit(code)
