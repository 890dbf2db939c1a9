"""Three run() calls in a fresh driver: one embedded Ray, one model load, teardown at shutdown.

Usage: three_runs.py LOG WORKING_DIR

Run by tests/test_ray_cluster.py in its own process (the embedded Ray must be this
driver's own). Nothing initialises Ray here but RayExecution, which gets
``runtime_env={"working_dir": WORKING_DIR, "env_vars": ...}``: the model's setup()
imports a module that only WORKING_DIR holds. Prints one JSON line.
"""

import json
import os
import sys

# The embedded Ray lives on loopback for this script only; token auth is not under test.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray

from crystallize import Experiment, Pipeline, PipelineStep, SeedPlugin, pipeline_step
from crystallize_ray import RayExecution

LOG, WORKING_DIR = sys.argv[1], sys.argv[2]


def note(what: str) -> None:
    with open(LOG, "a") as fh:
        fh.write(f"{what} {os.getpid()}\n")


class Model(PipelineStep):
    heavy = True

    def setup(self, ctx):
        import three_runs_helper  # only in the job's working_dir

        note("setup")
        self.bias = three_runs_helper.BIAS
        self.flag = os.environ.get("CRYSTALLIZE_THREE_RUNS", "")

    def teardown(self, ctx):
        note("teardown")

    def __call__(self, data, ctx):
        ctx.metrics.add("flag", self.flag)
        return data + self.bias


@pipeline_step()
def measure(data, ctx):
    return data, {"value": data + ctx["rng"].random()}


def lines(what: str) -> list[int]:
    with open(LOG) as fh:
        return [int(line.split()[1]) for line in fh if line.split()[0] == what]


def main() -> None:
    backend = RayExecution(
        init_kwargs={"address": "local", "num_cpus": 2, "log_to_driver": False},
        runtime_env={"working_dir": WORKING_DIR, "env_vars": {"CRYSTALLIZE_THREE_RUNS": "yes"}},
    )
    exp = Experiment(
        lambda ctx: float(ctx["replicate"]),
        Pipeline([Model(), measure()]),
        plugins=[SeedPlugin(seed=3), backend],
        name="three_runs",
    )
    nodes, alive_between, values, errors, flags = [], [], [], [], set()
    for _ in range(3):
        result = exp.run(replicates=8)
        flags |= set(result.metrics.baseline.metrics.get("flag", []))
        alive_between.append(ray.is_initialized())
        nodes.append(ray.get_runtime_context().get_node_id())
        values.append(result.metrics.baseline.metrics["value"])
        errors += [str(e) for e in result.errors]
    setups_before_shutdown = lines("setup")
    teardowns_before_shutdown = lines("teardown")
    backend.shutdown()
    print(
        json.dumps(
            {
                "errors": errors,
                "alive_between_runs": alive_between,
                "distinct_ray_nodes": len(set(nodes)),
                "same_values_each_run": values[0] == values[1] == values[2],
                "env_flags": sorted(flags),
                "setups": len(setups_before_shutdown),
                "setups_in_driver": setups_before_shutdown.count(os.getpid()),
                "teardowns_before_shutdown": len(teardowns_before_shutdown),
                "teardowns_after_shutdown": len(lines("teardown")),
                "initialized_after_shutdown": ray.is_initialized(),
            }
        )
    )


if __name__ == "__main__":
    main()
