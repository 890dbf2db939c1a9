"""Submit examples/quickstart.py as a Ray job to a local cluster, through the jobs API.

Run by tests/test_ray_cluster.py in its own process. Prints one JSON line with the
job's final status and its logs.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

# The jobs API of a cluster this script starts on loopback: token auth would need a
# token handed to the client, which is Ray's concern, not ours; disable it explicitly.
os.environ["RAY_AUTH_MODE"] = "disabled"

from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
    })
    try:
        client = None
        deadline = time.time() + 60
        while client is None:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{port}")
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        entrypoint = f"{sys.executable} {ROOT / 'examples' / 'quickstart.py'} --replicates 4"
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
        status = None
        while time.time() < deadline + 120:
            status = client.get_job_status(job_id)
            if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
                break
            time.sleep(1)
        print(json.dumps({"status": str(status), "logs": client.get_job_logs(job_id)}))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
