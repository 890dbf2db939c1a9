"""Ray behaviour that needs its own driver process: node loss, job submission, an embedded Ray,
user modules the workers cannot import, churn."""

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


def _run_script(*args: str, timeout: int = 240, cwd: Path = ROOT) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
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


def test_three_runs_start_ray_once_load_the_model_once_and_shutdown_tears_it_down(tmp_path):
    # A fresh driver that never calls ray.init: RayExecution starts an embedded Ray, with
    # runtime_env={"working_dir": ...} applied to the whole job.
    log, working_dir = tmp_path / "loads.log", tmp_path / "job"
    working_dir.mkdir()
    (working_dir / "three_runs_helper.py").write_text("BIAS = 0.5\n")
    report = _run_script(str(SCRIPTS / "three_runs.py"), str(log), str(working_dir))
    assert report["errors"] == []
    assert report["env_flags"] == ["yes"]  # runtime_env (working_dir too) reached the pool's actors
    assert report["alive_between_runs"] == [True, True, True]
    assert report["distinct_ray_nodes"] == 1  # the second and third run() started no Ray
    assert report["same_values_each_run"]
    assert (report["setups"], report["setups_in_driver"]) == (1, 0)
    assert report["teardowns_before_shutdown"] == 0
    assert report["teardowns_after_shutdown"] == 1
    assert report["initialized_after_shutdown"] is False


USER_MODULE = '''"""A user's test module: steps and a helper that Ray's workers cannot import."""
from crystallize import Experiment, Pipeline, PipelineStep, SeedPlugin, pipeline_step

OFFSET = 0.25


def helper(x):
    return x * 3 + OFFSET


class Scale(PipelineStep):
    heavy = True

    def setup(self, ctx):
        self.factor = 2

    def __call__(self, data, ctx):
        return helper(data) * self.factor


@pipeline_step()
def measure(data, ctx):
    if ctx["replicate"] == 3:
        raise ValueError("replicate 3 is refused")  # SOURCE-LINE
    return data, {"value": data + ctx["rng"].random()}


def build(backend):
    return Experiment(lambda ctx: float(ctx["replicate"]), Pipeline([Scale(), measure()]),
                      plugins=[SeedPlugin(seed=5), backend], name="foreign")
'''


def test_steps_of_a_module_the_workers_cannot_import_travel_by_value(tmp_path):
    modules, elsewhere = tmp_path / "modules", tmp_path / "elsewhere"
    modules.mkdir()
    elsewhere.mkdir()
    (modules / "test_user_steps.py").write_text(USER_MODULE)
    script = [str(SCRIPTS / "foreign_module.py"), str(modules), "test_user_steps"]
    report = _run_script(*script, cwd=elsewhere)
    assert not report["cwd_has_module"]
    assert report["errors"] == ["measure: ValueError: replicate 3 is refused"]
    assert report["same_as_serial"] and len(report["metrics"]["value"]) == 3
    # The worker's traceback shows the module's own file and line, not <dynamic-code>.
    assert str(modules / "test_user_steps.py") in report["tracebacks"][0]
    assert "SOURCE-LINE" in report["tracebacks"][0]

    control = _run_script(*script, "--by-reference", cwd=elsewhere)  # the same, pickled by reference
    assert any("ModuleNotFoundError" in e and "test_user_steps" in e for e in control["errors"]), control["errors"]


def test_runs_under_churn_come_back_once_each_with_serial_metrics():
    # A worker of the driver's own Ray SIGKILLed every second while 200 runs execute.
    report = _run_script(str(SCRIPTS / "churn.py"), "200", "1.0", timeout=280)
    assert report["kills"] > 0, "nothing was killed; the test shows nothing"
    assert report["errors"] == []
    assert report["replicates"] == list(range(200))  # none lost, none twice
    assert report["same_as_serial"]
    assert report["executions"] >= 200


STALE_DRIVER = """
import json, time
from crystallize import Experiment, Pipeline, pipeline_step
from crystallize_ray import RayExecution

@pipeline_step()
def double(data):
    return data, {"double": 2 * data}

start = time.monotonic()
result = Experiment(lambda ctx: ctx["replicate"], Pipeline([double()]), plugins=[RayExecution()]).run(replicates=4)
print(json.dumps({"seconds": time.monotonic() - start, "errors": [str(e) for e in result.errors],
                  "double": result.metrics.baseline.metrics["double"]}))
"""


def test_a_stale_ray_address_file_starts_a_local_ray_instead_of_hanging():
    # A Ray that died (or a test cluster) leaves its address behind; Ray's default
    # ray.init() would try to join it for many minutes. The address here cannot answer.
    import os
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a limit
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("192.0.2.2:6379")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(temp), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", STALE_DRIVER], capture_output=True, text=True, timeout=180, cwd=temp, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["double"] == [0, 2, 4, 6]
    assert "192.0.2.2:6379" in proc.stderr and "does not answer" in proc.stderr
    assert report["seconds"] < 90


EXIT_DRIVER = """
import os, sys
from crystallize import Experiment, Pipeline, PipelineStep
from crystallize_ray import RayExecution

LOG = sys.argv[1]

class Model(PipelineStep):
    heavy = True

    def setup(self, ctx):
        with open(LOG, "a") as fh:
            fh.write(f"setup {os.getpid()}\\n")

    def teardown(self, ctx):
        with open(LOG, "a") as fh:
            fh.write(f"teardown {os.getpid()}\\n")

    def __call__(self, data, ctx):
        return data, {"y": data}

result = Experiment(lambda ctx: 1.0, Pipeline([Model()]), plugins=[RayExecution()], name="exit").run(replicates=4)
assert result.errors == [], result.errors
# no shutdown(): the interpreter's exit must retire the pool
"""


def test_a_pool_is_torn_down_when_the_interpreter_exits(tmp_path):
    log = tmp_path / "model.log"
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_DRIVER, str(log)], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line.split() for line in log.read_text().splitlines()]
    setups = [pid for what, pid in lines if what == "setup"]
    assert len(setups) == 1 and [pid for what, pid in lines if what == "teardown"] == setups
