"""`crystallize run`: the console script on a real experiment file, in real processes.

Every test runs the installed ``crystallize`` command (or ``python -m crystallize``) in
a subprocess, as a batch job would, and checks its exit code, its output and the
result it saved.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crystallize import Result
from crystallize.run_cli import parse_setting

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "tests" / "scripts" / "cli_example.py"
SCRIPT = shutil.which("crystallize", path=str(Path(sys.executable).parent)) or "crystallize"
OPTIONS = [
    "--replicates",
    "--backend",
    "--workers",
    "--address",
    "--resume",
    "--timeout",
    "--out",
    "--plot",
    "--progress",
    "--no-progress",
    "--set",
    "--journal",
    "--no-journal",
    "--allow-failures",
]


def crystallize(*args: str, cwd: Path = ROOT, module: bool = False, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "crystallize"] if module else [SCRIPT]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CRYSTALLIZE_PROGRESS_EVERY": "0"},
    )


def test_help_lists_the_commands_and_every_option_of_run():
    top = crystallize("--help")
    assert top.returncode == 0 and "run " in top.stdout
    try:  # `cache` is registered lazily, where its module is installed
        importlib.import_module("crystallize.cache_cli")
    except ImportError:
        pass
    else:
        assert "cache " in top.stdout
    helped = crystallize("run", "--help")
    assert helped.returncode == 0
    for option in OPTIONS:
        assert option in helped.stdout, option
    assert "FILE.py[:NAME]" in helped.stdout and "Exit codes" in helped.stdout


def test_run_with_every_option_prints_the_table_saves_the_result_and_draws_it(tmp_path):
    pytest.importorskip("matplotlib")
    out, picture, log = tmp_path / "saved", tmp_path / "result.png", tmp_path / "log.txt"
    done = crystallize(
        "run",
        str(EXAMPLE),
        "--replicates",
        "3",
        "--backend",
        "process",
        "--workers",
        "2",
        "--timeout",
        "30",
        "--out",
        str(out),
        "--plot",
        str(picture),
        "--progress",
        "--set",
        "lr=0.2",
        "--set",
        f"log={log}",
        "--journal",
        str(tmp_path / "journal"),
    )
    assert done.returncode == 0, done.stderr
    assert "Experiment cli_example: 6 runs, 0 failed" in done.stdout
    assert "Hypothesis 'faster_learns_more'" in done.stdout
    assert "crystallize cli_example: started, 6 runs planned" in done.stderr  # progress as log lines
    result = Result.load(out)
    assert result.metrics.baseline.metrics["score"][0] == pytest.approx(2.0, abs=0.01)  # lr=0.2 reached the runs
    assert result.metrics.treatments["fast"].metrics["score"][0] == pytest.approx(3.0, abs=0.01)
    assert (
        len(set(result.metrics.baseline.metrics["pid"])) >= 1
        and os.getpid() not in result.metrics.baseline.metrics["pid"]
    )
    assert result.provenance["backend"] == "ParallelExecution"
    assert picture.stat().st_size > 0
    assert len(log.read_text().splitlines()) == 6

    resumed = crystallize(
        "run",
        str(EXAMPLE),
        "-n",
        "4",
        "--resume",
        "--no-progress",
        "--out",
        str(out),
        "--set",
        "lr=0.2",
        "--set",
        f"log={log}",
        "--journal",
        str(tmp_path / "journal"),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "6 of 8 runs resumed" in resumed.stderr
    assert len(log.read_text().splitlines()) == 8  # only replicate 3 of each condition ran
    assert Result.load(out).provenance["resumed"] == 6


@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
def test_failed_runs_exit_1_with_every_failure_and_the_first_traceback(tmp_path, module):
    done = crystallize(
        "run",
        f"{EXAMPLE}:build",
        "--set",
        "fail_at=1",
        "--no-journal",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
        module=module,
    )
    assert done.returncode == 1
    assert "2 of 4 runs of experiment 'cli_example' failed:" in done.stderr
    assert "replicate 1, condition 'baseline', at train: ValueError: loss is nan at lr=0.1" in done.stderr
    assert 'raise ValueError(f"loss is nan at lr={lr}")' in done.stderr  # the first traceback
    assert len(Result.load(tmp_path / "out").errors) == 2  # saved all the same

    allowed = crystallize(
        "run",
        str(EXAMPLE),
        "--set",
        "fail_at=1",
        "--no-journal",
        "--no-progress",
        "--out",
        str(tmp_path / "out2"),
        "--allow-failures",
    )
    assert allowed.returncode == 0 and "2 failed" in allowed.stdout


def test_a_timeout_stops_a_hanging_run_and_fails_the_job(tmp_path):
    done = crystallize(
        "run",
        str(EXAMPLE),
        "--backend",
        "process",
        "--timeout",
        "1",
        "--set",
        "hang_at=0",
        "--no-journal",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    )
    assert done.returncode == 1
    assert "at train: TimeoutError: The run exceeded its 1 s timeout in step 'train'" in done.stderr


@pytest.mark.parametrize("backend", ["serial", "thread", "async"])
def test_the_in_process_backends_run_and_timeouts_say_where_they_are_possible(tmp_path, backend):
    done = crystallize(
        "run", str(EXAMPLE), "--backend", backend, "--no-journal", "--no-progress", "--out", str(tmp_path / "out")
    )
    assert done.returncode == 0, done.stderr
    assert Result.load(tmp_path / "out").provenance["backend"] in (
        "SerialExecution",
        "ParallelExecution",
        "AsyncExecution",
    )
    if backend != "async":
        refused = crystallize("run", str(EXAMPLE), "--backend", backend, "--timeout", "5", "--no-journal")
        assert refused.returncode == 2
        assert f"--backend {backend}" in refused.stderr and "executor_type='process'" in refused.stderr


def test_wrong_targets_exit_2_and_say_what_the_file_holds(tmp_path):
    two = tmp_path / "two.py"
    two.write_text(
        "from crystallize import Experiment, pipeline_step\n"
        "@pipeline_step()\ndef s(data):\n    return data\n"
        "a = Experiment(lambda ctx: 0, [s()])\nb = Experiment(lambda ctx: 0, [s()])\n"
    )
    ambiguous = crystallize("run", str(two))
    assert ambiguous.returncode == 2 and "Experiments a, b" in ambiguous.stderr and ":NAME" in ambiguous.stderr
    chosen = crystallize("run", f"{two}:b", "--no-journal", "--no-progress", "--out", str(tmp_path / "o"))
    assert chosen.returncode == 0, chosen.stderr
    missing = crystallize("run", f"{EXAMPLE}:nothing")
    assert missing.returncode == 2 and "has no 'nothing'" in missing.stderr
    nofile = crystallize("run", str(tmp_path / "absent.py"))
    assert nofile.returncode == 2 and "is not a file" in nofile.stderr
    bad_set = crystallize("run", str(EXAMPLE), "--set", "no-equals-sign")
    assert bad_set.returncode == 2 and "KEY=VALUE" in bad_set.stderr


def test_the_default_output_folder_is_named_after_the_experiment(tmp_path):
    done = crystallize("run", str(EXAMPLE), "--no-journal", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (saved,) = (tmp_path / "results").iterdir()
    assert saved.name.startswith("cli_example-") and Result.load(saved).errors == []


def test_set_values_are_json_then_python_literals_then_strings():
    assert parse_setting("lr=1e-3") == ("lr", 0.001)
    assert parse_setting("layers=[64,64]") == ("layers", [64, 64])
    assert parse_setting("pair=(1, 2)") == ("pair", (1, 2))
    assert parse_setting("flag=true") == ("flag", True)
    assert parse_setting("name=resnet=50") == ("name", "resnet=50")
    assert parse_setting("empty=") == ("empty", "")


@pytest.mark.ray
@pytest.mark.slow
def test_crystallize_run_is_a_ray_job_submit_entrypoint_and_failed_runs_fail_the_job(tmp_path):
    pytest.importorskip("ray")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "cli_job_submit.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    ok, failing = report["ok"], report["failing"]
    assert ok["returncode"] == 0, ok["logs"][-3000:]
    assert "succeeded" in ok["logs"] and "Experiment cli_example: 6 runs, 0 failed" in ok["logs"]
    assert Result.load(tmp_path / "ok").provenance["backend"] == "RayExecution"
    assert failing["returncode"] != 0, failing["logs"][-3000:]
    assert "2 of 6 runs of experiment 'cli_example' failed" in failing["logs"]
    assert "FAILED" in failing["logs"]  # the job's status
