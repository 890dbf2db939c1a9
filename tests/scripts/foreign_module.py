"""Steps from a module only the driver can import, run on Ray workers started elsewhere.

Usage: foreign_module.py MODULE_DIR MODULE_NAME [--by-reference]

Run by tests/test_ray_cluster.py with a working directory that is not MODULE_DIR. Ray
is initialised *before* MODULE_DIR joins ``sys.path``, so its workers get neither it
nor the driver's working directory with the module in it: the module's steps reach
them only if crystallize ships the module by value. ``--by-reference`` turns that
off (the control: it must fail with ModuleNotFoundError). Prints one JSON line.
"""

import json
import logging
import os
import sys

# The embedded Ray lives on loopback for this script only; token auth is not under test.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray

import crystallize.by_value
from crystallize import SerialExecution
from crystallize_ray import RayExecution


def main() -> None:
    module_dir, module_name = sys.argv[1], sys.argv[2]
    if "--by-reference" in sys.argv:  # the control: pickle the user's module by reference
        crystallize.by_value.user_modules = lambda *roots: []
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    sys.path.insert(0, module_dir)  # only the driver can import it from here on
    module = __import__(module_name)
    on_ray = module.build(RayExecution(heavy={"Scale": {"pool_size": 1}})).run(replicates=4)
    serial = module.build(SerialExecution()).run(replicates=4)
    print(
        json.dumps(
            {
                "cwd_has_module": os.path.exists(os.path.join(os.getcwd(), module_name + ".py")),
                "errors": sorted({f"{e.step}: {e.type}: {e.message[:200]}" for e in on_ray.errors}),
                "same_as_serial": on_ray.metrics.baseline.metrics == serial.metrics.baseline.metrics,
                "metrics": on_ray.metrics.baseline.metrics,
                "tracebacks": [e.traceback for e in on_ray.errors][:1],
            }
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
