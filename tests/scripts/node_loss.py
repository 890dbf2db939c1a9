"""Remove a node of a 3-node local Ray cluster while an experiment runs on it.

Run by tests/test_ray_cluster.py in its own process (a driver connects to one Ray
only). Prints one JSON line describing what came back.
"""

import json
import os
import sys
import time

# The cluster lives on loopback for this script only; token auth is not under test.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray
from ray.cluster_utils import Cluster

from crystallize import BasePlugin, Experiment, FrozenContext, Pipeline, SeedPlugin, pipeline_step
from crystallize_ray import RayExecution


@pipeline_step()
def slow_draw(data, ctx: FrozenContext):
    time.sleep(0.3)
    ctx.metrics.add("value", ctx.get("rng").random())
    ctx.metrics.add("node", ray.get_runtime_context().get_node_id())
    return data


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    doomed_id = doomed.node_id

    class RemoveNodeMidRun(BasePlugin):
        """Driver side: once two runs came back from the doomed node, kill that node.

        The call blocks the driver while the node dies; the node's in-flight tasks are
        killed mid-run, and the runs not yet submitted go to the surviving node.
        """

        removed_after = None

        def on_run_result(self, experiment, run):
            if run.metrics.get("node") == [doomed_id] and self.removed_after is None:
                self.seen = getattr(self, "seen", 0) + 1
                if self.seen == 2:
                    cluster.remove_node(doomed, allow_graceful=False)
                    self.removed_after = self.seen_total + 1
            self.seen_total = getattr(self, "seen_total", 0) + 1

    remover = RemoveNodeMidRun()
    exp = Experiment(
        datasource=lambda ctx: [1],
        pipeline=Pipeline([slow_draw()]),
        plugins=[SeedPlugin(seed=11), RayExecution(batch_size=1, max_retries=5), remover],
        name="node_loss",
    )
    started = time.time()
    result = exp.run(replicates=runs)
    nodes = result.metrics.baseline.metrics.get("node", [])
    deadline = time.time() + 60  # the GCS notices a killed node after a few heartbeats
    while any(n["NodeID"] == doomed_id and n["Alive"] for n in ray.nodes()) and time.time() < deadline:
        time.sleep(0.5)
    print(
        json.dumps(
            {
                "runs": sorted(r.replicate for r in result.runs),
                "errors": [str(e) for e in result.errors],
                "values": result.metrics.baseline.metrics.get("value", []),
                "ran_on_removed_node": sum(1 for n in nodes if n == doomed_id),
                "alive_nodes": sum(1 for n in ray.nodes() if n["Alive"]),
                "results_before_removal": remover.removed_after,
                "seconds": time.time() - started,
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
