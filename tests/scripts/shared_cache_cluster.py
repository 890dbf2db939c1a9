"""Nodes of a 3-node local Ray cluster reuse each other's step outputs.

Run by tests/test_shared_cache_ray.py in its own process (a driver connects to one
Ray only), with the test session's S3 server: ``shared_cache_cluster.py ENDPOINT
BUCKET WORKDIR``. Each worker node has its own local cache directory
(``CRYSTALLIZE_CACHE_DIR`` in its raylet's environment); the durable store is the
bucket. Prints one JSON line describing what happened.

1. In-cluster tier: node A computes; the bucket is then emptied; node B still hits,
   so its copy came through Ray's object store.
2. Durable tier only (``object_store_cache=False``): node A computes another entry;
   node B hits it through the bucket.
"""

import json
import os
import sys
import time
from pathlib import Path

# The cluster lives on loopback for this script only; token auth is not under test.
os.environ["RAY_AUTH_MODE"] = "disabled"

import fsspec
import ray
from ray.cluster_utils import Cluster

from crystallize import Experiment, UrlStore, pipeline_step
from crystallize_ray import RayExecution


@pipeline_step(cacheable=True)
def embed(data, *, calls_file, variant):
    with open(calls_file, "a") as fh:
        fh.write(f"{variant}\n")
    time.sleep(0.2)
    return bytes(range(256)) * 2048  # 512 kB: an output blob


@pipeline_step()
def where(data, ctx):
    # Not cached: says which node the run was on (a hit replays the cached step's metrics).
    ctx.metrics.add("node", ray.get_runtime_context().get_node_id())
    return data


def main() -> None:
    endpoint, bucket, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    calls = workdir / "calls.txt"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {}
    for name in ("a", "b"):
        local = workdir / f"node-{name}"
        nodes[name] = cluster.add_node(
            num_cpus=1, resources={f"node_{name}": 1}, env_vars={"CRYSTALLIZE_CACHE_DIR": str(local)}
        )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    store = UrlStore(f"s3://{bucket}/cluster")
    report: dict = {}

    def run(node: str, variant: str, shared: bool) -> list:
        exp = Experiment(
            lambda ctx: [1, 2, 3],
            [embed(calls_file=str(calls), variant=variant), where()],
            replicates=2,
            cache=store,
            plugins=[RayExecution(resources={f"node_{node}": 1}, object_store_cache=shared)],
        )
        result = exp.run()
        assert result.errors == [], result.errors
        return [{"cache": r.provenance[0].cache, "node": r.metrics["node"][0]} for r in result.runs]

    report["tier_a"] = run("a", "tier", shared=True)
    fsspec.filesystem("s3").rm(f"{bucket}/cluster", recursive=True)  # only the cluster has it now
    report["tier_b"] = run("b", "tier", shared=True)
    report["durable_a"] = run("a", "durable", shared=False)
    report["durable_b"] = run("b", "durable", shared=False)
    report["calls"] = calls.read_text().split()
    report["node_ids"] = {name: node.node_id for name, node in nodes.items()}
    report["local_b"] = sorted(p.name for p in (workdir / "node-b").rglob("*.pkl"))
    report["local_a"] = sorted(p.name for p in (workdir / "node-a").rglob("*.pkl"))
    print(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
