"""A smoke check for a machine with a GPU: a heavy step's pool gets the GPU and keeps its model there.

Run it on a GPU node (never in CI; the test suite needs no GPU)::

    python cluster/gpu_check.py            # starts an embedded Ray on this machine
    RAY_ADDRESS=auto python cluster/gpu_check.py   # or on a running cluster

It runs a ``heavy = True`` class step as an actor pool with
``RayExecution(heavy={"GpuModel": {"pool_size": 1, "num_gpus": 1}})``; the runs
themselves are CPU tasks. Checks: the pool is placed (Ray gave its actor a GPU:
``ray.get_gpu_ids()`` non-empty, ``CUDA_VISIBLE_DEVICES`` set), ``setup()`` ran once,
in that actor and never in the driver, every run's call was served by that actor
(provenance ``served_by``), and, when torch with CUDA is installed, the "model" (a
tensor) lives on the GPU and stays there between calls. It prints one JSON line and
exits non-zero when any check fails.
"""

from __future__ import annotations

import json
import os
import sys

from crystallize import Experiment, Pipeline, PipelineStep, SeedPlugin
from crystallize_ray import RayExecution


class GpuModel(PipelineStep):
    """Loads its "model" in setup(), where the step lives: the pool's GPU actor."""

    heavy = True

    def setup(self, ctx):
        import ray

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.setup_pid = os.getpid()
        self.model_device = "none"
        try:
            import torch
        except ImportError as exc:
            self.model_device = f"no torch in the actor: {exc}"
            return
        if torch.cuda.is_available():
            self.model = torch.ones(1024, 1024, device="cuda")
            self.model_device = str(self.model.device)

    def __call__(self, data, ctx):
        model = getattr(self, "model", None)
        return data, {
            "gpu_ids": ",".join(getattr(self, "gpu_ids", [])),
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "model_device": str(model.device) if model is not None else getattr(self, "model_device", "setup not run"),
            "setup_pid": getattr(self, "setup_pid", -1),
            "pid": os.getpid(),
        }


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main() -> int:
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < 1:
        # The pool would not be placed: say so rather than wait for the placement timeout.
        print(
            json.dumps(
                {
                    "gpus": gpus,
                    "checks": {"cluster_has_gpu": False},
                    "error": "Ray sees no GPU on this machine or cluster",
                }
            )
        )
        ray.shutdown()
        return 1
    torch_cuda = _torch_cuda()
    backend = RayExecution(heavy={"GpuModel": {"pool_size": 1, "num_gpus": 1}}, placement_timeout=120)
    exp = Experiment(lambda ctx: 0, Pipeline([GpuModel()]), name="gpu_check", plugins=[SeedPlugin(seed=0), backend])
    result = exp.run(replicates=4)
    metrics = result.metrics.baseline.metrics
    served = {run.provenance[0].served_by for run in result.runs if run.provenance}
    checks = {
        "cluster_has_gpu": gpus >= 1,
        "no_errors": not result.errors,
        "pool_actor_got_a_gpu": bool(metrics) and all(metrics["gpu_ids"]),
        "cuda_visible_devices_set": bool(metrics) and all(metrics["cuda_visible"]),
        "setup_ran_once_in_the_actor": bool(metrics)
        and len(set(metrics["setup_pid"])) == 1
        and os.getpid() not in metrics["setup_pid"],
        "every_call_served_by_the_pool": len(served) == 1 and None not in served,
        # With torch and CUDA in the driver, the actor must hold its model on the GPU.
        "model_on_gpu_when_torch_has_cuda": bool(metrics)
        and all(d.startswith("cuda") or (d == "none" and not torch_cuda) for d in metrics["model_device"]),
    }
    print(
        json.dumps(
            {
                "gpus": gpus,
                "torch_cuda_in_driver": torch_cuda,
                "checks": checks,
                "metrics": metrics,
                "served_by": sorted(map(str, served)),
                "errors": [str(e) for e in result.errors],
            }
        )
    )
    backend.shutdown()
    ray.shutdown()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
