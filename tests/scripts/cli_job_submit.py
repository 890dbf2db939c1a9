"""`crystallize run` as the entrypoint of `ray job submit`, against a local Ray cluster.

Run by tests/test_cli.py in its own process. It reuses job_submit.py's set-up (a one-node
cluster with the jobs API on loopback), submits tests/scripts/cli_example.py twice with
the real `ray job submit` CLI -- once as is, once with failing runs -- and prints one
JSON line with each submission's exit code and output.

Usage: cli_job_submit.py OUTDIR
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import job_submit  # noqa: E402  (sets RAY_AUTH_MODE=disabled and PATH, with the reasons)
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def submit(address: str, out: Path, *extra: str) -> dict:
    command = [
        "ray",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--",
        "crystallize",
        "run",
        "tests/scripts/cli_example.py",
        "--backend",
        "ray",
        "--replicates",
        "3",
        "--out",
        str(out),
        "--no-journal",
        *extra,
    ]
    deadline = time.time() + 90
    while True:
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "RAY_ADDRESS": address}
        )
        # The jobs API answers before the node's job agent is up; Ray asks to retry.
        if "No available agent" not in proc.stderr or time.time() > deadline:
            return {"returncode": proc.returncode, "logs": proc.stdout + proc.stderr}
        time.sleep(2)


def main() -> None:
    out = Path(sys.argv[1])
    port = job_submit.free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            "dashboard_agent_listen_port": job_submit.free_port(),
        },
    )
    try:
        address = f"http://127.0.0.1:{port}"
        job_submit.wait_for(f"{address}/api/version", 60)
        ok = submit(address, out / "ok")
        failing = submit(address, out / "failing", "--set", "fail_at=1")
        print(json.dumps({"ok": ok, "failing": failing}))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
