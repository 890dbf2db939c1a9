# ruff: noqa: I001  (the reference runner must be imported first: it fixes sys.path)
"""The heavy-step workload of bench_heavy.py on the *reference* package (crystallize-ml 0.27).

Run only with the reference virtualenv's interpreter, by benchmarks/bench_heavy.py::

    /work/refenv/bin/python benchmarks/_reference_heavy.py --backend process --log /tmp/loads.log

The reference has no heavy steps and no pools: its idiom for a model is
``resource_factory(load)``, which loads once per worker process (thread-local cache)
on first use. The step here loads a "model" (a ``--load``-second sleep) that way and
spends ``--call-ms`` ms of CPU per call. Backends: the reference's process pool
(``ParallelExecution(executor_type="process", max_workers=2)``) and its Ray plugin
(one Ray task per replicate, with the runtime patch ``_reference_runner.py``
documents). Prints one JSON line: seconds, loads (lines in ``--log``), runs.
"""

from __future__ import annotations

import argparse
import os
import time

import _reference_runner as ref  # path hygiene, scratch dir, stdout reserved for the JSON line
from crystallize import (  # the reference package (checked by _reference_runner)
    Experiment,
    ParallelExecution,
    Pipeline,
    Treatment,
    data_source,
    pipeline_step,
    resource_factory,
)

LOG = os.environ.get("CRYSTALLIZE_REF_HEAVY_LOG", "")
LOAD_SECONDS = float(os.environ.get("CRYSTALLIZE_REF_HEAVY_LOAD", "1.0"))
CALL_MS = float(os.environ.get("CRYSTALLIZE_REF_HEAVY_CALL_MS", "10"))


def _load_model(ctx):
    time.sleep(LOAD_SECONDS)
    with open(LOG, "a") as fh:
        fh.write(f"load {os.getpid()}\n")
    return {"weight": 2.0}


MODEL = resource_factory(_load_model, key="bench-heavy-model")


def _spin(ms: float) -> None:
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass


@data_source
def replicate_source(ctx):
    return float(ctx.get("replicate", 0))


@pipeline_step()
def predict(data, ctx):
    model = MODEL(ctx)
    _spin(CALL_MS)
    return data, {"value": data * model["weight"] + ctx.get("offset", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("process", "ray"), required=True)
    parser.add_argument("--replicates", type=int, default=40)
    args = parser.parse_args()
    plugins: list = []
    info: dict = {}
    if args.backend == "process":
        plugins.append(ParallelExecution(executor_type="process", max_workers=2))
    else:
        import ray
        from crystallize_extras.ray_plugin import RayExecution

        ref._patch_ray_execution(RayExecution)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
            runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("CRYSTALLIZE_REF")}},
        )
        plugins.append(RayExecution())
    exp = Experiment(
        datasource=replicate_source(),
        pipeline=Pipeline([predict()]),
        plugins=plugins,
        name="reference_heavy",
        replicates=args.replicates,
        treatments=[Treatment("shifted", {"offset": 1.0})],
    )
    started = time.perf_counter()
    result = exp.run()
    seconds = time.perf_counter() - started
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} replicate errors: {next(iter(result.errors.values()))!r}")
    loads = len(open(LOG).read().splitlines()) if os.path.exists(LOG) else 0
    ref._emit(
        {
            "backend": args.backend,
            "seconds": round(seconds, 3),
            "loads": loads,
            "runs": 2 * args.replicates,
            "version": ref.VERSION,
            **info,
        }
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:
        ref._emit({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from exc
