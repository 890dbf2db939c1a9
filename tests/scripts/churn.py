"""A short run under churn: a random worker of this driver's Ray SIGKILLed every second.

Usage: churn.py RUNS EVERY_SECONDS

Run by tests/test_ray_cluster.py in its own process (the Ray is this driver's own:
RayExecution starts it). A thread kills a random worker process of that Ray (a
child of its raylet titled ``ray::...``, the agents excepted, up for a second at
least: see benchmarks/bench_churn.py for why) every EVERY_SECONDS while the
experiment runs. Prints one JSON line with counts: what came back, how
often, whether the metrics equal SerialExecution's. Timing is benchmarks/bench_churn.py's
business, not this script's.
"""

import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

# The Ray lives on loopback for this script only; token auth is not under test.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray

from crystallize import Experiment, Pipeline, SeedPlugin, SerialExecution, pipeline_step
from crystallize_ray import RayExecution

LOG = tempfile.mktemp(prefix="crystallize-churn-test-", suffix=".log")


@pipeline_step()
def nap(data, ctx, *, pause: float = 0.0, log: str = ""):
    if log:
        with open(log, "a") as fh:
            fh.write(f"{ctx['replicate']}\n")
    time.sleep(pause)
    return data, {"value": ctx["rng"].random()}


def workers(session: str) -> list[int]:
    def cmdline(pid: int) -> list[bytes]:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return []

    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return -1

    def age(pid: int) -> float:
        try:
            started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
            return float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    raylets = {
        p for p in pids if (c := cmdline(p)) and c[0].endswith(b"raylet") and any(session.encode() in a for a in c)
    }
    return [
        p
        for p in pids
        if (c := cmdline(p))
        and c[0].startswith(b"ray::")
        and not c[0].endswith(b"Agent")
        and parent(p) in raylets
        and age(p) >= 1.0
    ]


def main() -> None:
    runs, every = int(sys.argv[1]), float(sys.argv[2])
    experiment = lambda backend, **params: Experiment(  # noqa: E731
        lambda ctx: 0, Pipeline([nap(**params)]), plugins=[SeedPlugin(seed=2), backend], cache=False, name="churn"
    )
    serial = experiment(SerialExecution()).run(replicates=runs)
    backend = RayExecution(max_retries=10, init_kwargs={"address": "local", "num_cpus": 2, "log_to_driver": False})
    experiment(backend).run(replicates=4)  # Ray and its workers up
    session = ray.get_runtime_context().get_session_name()
    kills, stop = [0], threading.Event()

    def churn() -> None:
        rng = random.Random(0)
        while not stop.wait(every):
            found = workers(session)
            if found:
                try:
                    os.kill(rng.choice(found), signal.SIGKILL)
                    kills[0] += 1
                except ProcessLookupError:
                    pass

    threading.Thread(target=churn, daemon=True).start()
    try:
        result = experiment(backend, pause=0.02, log=LOG).run(replicates=runs)
    finally:
        stop.set()
    executions = Path(LOG).read_text().splitlines() if os.path.exists(LOG) else []
    backend.shutdown()
    print(
        json.dumps(
            {
                "kills": kills[0],
                "replicates": sorted(r.replicate for r in result.runs),
                "errors": [str(e) for e in result.errors],
                "same_as_serial": result.metrics.baseline.metrics == serial.metrics.baseline.metrics,
                "executions": len(executions),
            }
        )
    )


if __name__ == "__main__":
    main()
