"""Submit examples/quickstart.py to a local Ray cluster with cluster/submit_job.sh.

Run by tests/test_ray_cluster.py in its own process: it starts a one-node cluster with
the jobs API on loopback, runs the real `ray job submit` CLI through the script, and
prints one JSON line with the CLI's exit code and output.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The jobs API of a cluster this script starts on loopback: token auth would need a
# token handed to the client, which is Ray's concern, not ours; disable it explicitly.
os.environ["RAY_AUTH_MODE"] = "disabled"
# The job's driver runs `python`, and the script runs `ray`: both from this venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            # Another Ray on this machine (the test session's) holds the default agent port.
            "dashboard_agent_listen_port": free_port(),
        },
    )
    try:
        address = f"http://127.0.0.1:{port}"
        wait_for(f"{address}/api/version", 60)
        cache = tempfile.mkdtemp(prefix="crystallize-job-cache-")
        env = {
            **os.environ,
            "RAY_ADDRESS": address,
            "CRYSTALLIZE_CACHE_DIR": cache,
            "CRYSTALLIZE_PIP": "",
        }  # the node already has crystallize (this venv)
        deadline = time.time() + 90
        while True:
            proc = subprocess.run(
                ["bash", "cluster/submit_job.sh", "--replicates", "4"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            # The jobs API answers before the node's job agent is up; Ray asks to retry.
            if "No available agent" not in proc.stderr or time.time() > deadline:
                break
            time.sleep(2)
        print(
            json.dumps(
                {
                    "returncode": proc.returncode,
                    "logs": proc.stdout + proc.stderr,
                    "cache_entries": len(list(Path(cache).rglob("*.pkl"))),
                }
            )
        )
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
