"""Ray behaviour that needs its own driver process: node loss, job submission, embedded start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).parents[1]


def _run_script(*args: str, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in output:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_removing_a_node_mid_run_loses_nothing():
    report = _run_script(str(SCRIPTS / "node_loss.py"), "24")
    assert report["ran_on_removed_node"] > 0, "no run was on the removed node before it went"
    assert report["results_before_removal"] < 24, "the node was removed after the run ended"
    assert report["alive_nodes"] == 2
    assert report["errors"] == []
    assert report["runs"] == list(range(24))  # every run exactly once
    assert len(report["values"]) == 24


def test_cluster_submit_script_runs_the_quickstart_as_a_ray_job():
    # The real `ray job submit` CLI, through cluster/submit_job.sh, against a real cluster.
    report = _run_script(str(SCRIPTS / "job_submit.py"))
    assert report["returncode"] == 0, report["logs"][-3000:]
    assert "succeeded" in report["logs"]
    # CRYSTALLIZE_CACHE_DIR reached the job: its cacheable step wrote entries there.
    assert report["cache_entries"] > 0
    assert "Experiment quickstart: 12 runs, 0 failed" in report["logs"]
    assert "Best treatment: lr_0.10" in report["logs"]


def test_embedded_ray_is_started_and_shut_down_by_the_run(tmp_path):
    code = (
        "import ray\n"
        "from crystallize import Experiment, Pipeline, pipeline_step\n"
        "from crystallize_ray import RayExecution\n"
        "@pipeline_step()\n"
        "def one(data):\n"
        "    return data, {'x': 1}\n"
        "exp = Experiment(datasource=lambda ctx: 0, pipeline=Pipeline([one()]),\n"
        "                 plugins=[RayExecution(init_kwargs={'address': 'local', 'num_cpus': 2})])\n"
        "r = exp.run(replicates=3)\n"
        'print(\'{"metrics": %s, "initialized_after": %s}\' % (\n'
        "    r.metrics.baseline.metrics['x'], str(ray.is_initialized()).lower()))\n"
    )
    script = tmp_path / "embedded.py"
    script.write_text(code)
    report = _run_script(str(script))
    assert report == {"metrics": [1, 1, 1], "initialized_after": False}
