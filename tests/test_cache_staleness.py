"""No stale hits from code: fingerprints re-read at every run, constructor arguments keyed.

A step's code key is remembered between calls (fingerprinting is not free), but never
across ``run()`` calls: a module constant rebound, or a module-level list changed,
between two runs in one process is a miss. A class step is identified by its
constructor arguments as well as its ``params``: ``Scale(3)`` never returns
``Scale(2)``'s output. Executions are counted in a file, so process workers count.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest
from _counting import count_call, executions, start_counting

from crystallize import (
    Experiment,
    FrozenContext,
    ParallelExecution,
    Pipeline,
    PipelineStep,
    SerialExecution,
    pipeline_step,
)

THIS = sys.modules[__name__]


@pytest.fixture(autouse=True)
def counter(tmp_path, monkeypatch):
    return start_counting(tmp_path, monkeypatch)


BACKENDS = {
    "serial": lambda: SerialExecution(),
    "process": lambda: ParallelExecution(max_workers=2, executor_type="process"),
}

FACTOR = 2
OFFSETS = [1]


@pipeline_step(cacheable=True)
def times_factor(data):
    count_call()
    return data * FACTOR, {"out": data * FACTOR}


@pipeline_step(cacheable=True)
def plus_offsets(data):
    count_call()
    return data + sum(OFFSETS), {"out": data + sum(OFFSETS)}


def outs(result) -> list:
    assert result.errors == []
    return result.metrics.baseline.metrics["out"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_constant_rebound_between_two_runs_is_a_miss(backend, counter, monkeypatch):
    exp = Experiment(lambda ctx: 3, [times_factor()], plugins=[BACKENDS[backend]()], replicates=2)
    assert outs(exp.run()) == [6, 6]
    ran = executions(counter)
    assert ran == 1 or backend == "process"  # two workers may both miss at first
    monkeypatch.setattr(THIS, "FACTOR", 5)
    assert outs(exp.run()) == [15, 15]
    assert executions(counter) > ran
    ran = executions(counter)
    monkeypatch.setattr(THIS, "FACTOR", 2)
    assert outs(exp.run()) == [6, 6]  # the first entry is still there
    assert executions(counter) == ran


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_level_list_changed_between_two_runs_is_a_miss(backend, counter, monkeypatch):
    monkeypatch.setattr(THIS, "OFFSETS", [1])
    exp = Experiment(lambda ctx: 10, [plus_offsets()], plugins=[BACKENDS[backend]()], replicates=2)
    assert outs(exp.run()) == [11, 11]
    ran = executions(counter)
    OFFSETS.append(5)
    assert outs(exp.run()) == [16, 16]
    assert executions(counter) > ran
    ran = executions(counter)
    assert outs(exp.run()) == [16, 16]
    assert executions(counter) == ran


def test_one_pipeline_run_twice_rereads_the_code(counter, monkeypatch):
    pipeline = Pipeline([times_factor()])
    assert pipeline.run(1) == 2
    monkeypatch.setattr(THIS, "FACTOR", 7)
    assert pipeline.run(1) == 7
    assert executions(counter) == 2


class Scale(PipelineStep):
    """A class step configured by its constructor only (no ``params``)."""

    cacheable = True

    def __init__(self, factor, *, shift=0):
        self.factor, self.shift = factor, shift

    def __call__(self, data, ctx):
        count_call()
        ctx.metrics.add("out", data * self.factor + self.shift)
        return data * self.factor + self.shift


class HeavyScale(Scale):
    heavy = True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [Scale, HeavyScale])
def test_a_class_step_is_keyed_by_its_constructor_arguments(backend, cls, counter):
    def run(step):
        return outs(Experiment(lambda ctx: 3, [step], plugins=[BACKENDS[backend]()]).run())

    assert run(cls(2)) == [6]
    assert run(cls(3)) == [9], "Scale(3) was served Scale(2)'s output"
    assert run(cls(3, shift=1)) == [10]
    assert executions(counter) == 3
    # The arguments are bound to __init__'s signature: spelled differently, or with
    # a default written out, they are the same recipe.
    assert run(cls(factor=3, shift=1)) == [10]
    assert run(cls(2, shift=0)) == [6]
    assert run(cls(3)) == [9]
    assert executions(counter) == 3


class Locked(PipelineStep):
    cacheable = True

    def __init__(self, lock, factor):
        self.factor = factor

    def __call__(self, data, ctx):
        count_call()
        return data * self.factor


def test_unhashable_constructor_arguments_run_uncached_with_one_warning(counter, caplog):
    exp = Experiment(lambda ctx: 2, [Locked(threading.Lock(), 4)], replicates=3)
    with caplog.at_level(logging.WARNING, logger="crystallize"):
        for _ in range(2):
            result = exp.run()
            assert result.errors == []
            assert [r.provenance[0].cache for r in result.runs] == ["skipped"] * 3
    assert executions(counter) == 6
    warnings = [r for r in caplog.records if "constructor arguments" in r.getMessage()]
    assert len(warnings) == 1
    assert "'Locked'" in warnings[0].getMessage() and "_thread.lock" in warnings[0].getMessage()


def test_params_still_count_beside_the_constructor_arguments(counter):
    class Configured(Scale):
        @property
        def params(self):
            return {"factor": self.factor}

    ctx = FrozenContext()
    assert Pipeline([Configured(2)]).run(1, ctx) == 2
    assert Pipeline([Configured(3)]).run(1) == 3
    assert Pipeline([Configured(2)]).run(1) == 2
    assert executions(counter) == 2
    assert ctx.provenance[0].params == {"factor": 2}


# -- code edited, and constants rebound, in fresh interpreters --------------------------

MODULE = """\
import os

from crystallize import PipelineStep

OFFSET = {offset}


class Shift(PipelineStep):
    cacheable = True

    def __init__(self, by):
        self.by = by

    def __call__(self, data, ctx):
        with open(os.environ["CRYSTALLIZE_TEST_COUNTER"], "a") as fh:
            fh.write("call\\n")
        return {body}
"""

DRIVER = """\
import json
import sys

sys.path.insert(0, sys.argv[1])
import stepmod
from crystallize import Experiment

def run(by):
    result = Experiment(lambda ctx: 10, [stepmod.Shift(by)], replicates=2).run()
    assert result.errors == [], result.errors
    return [[p.cache for p in r.provenance] for r in result.runs], [r.provenance[0].miss_reason for r in result.runs]

first = run(1)
stepmod.OFFSET = 100  # rebound between two runs of one process
second = run(1)
third = run(2)
print(json.dumps({"first": first, "second": second, "third": third}))
"""


def test_edits_and_rebinding_in_fresh_processes(tmp_path, counter):
    src = tmp_path / "src"
    src.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(
        os.environ,
        CRYSTALLIZE_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONDONTWRITEBYTECODE="1",
    )

    def run(**fields):
        (src / "stepmod.py").write_text(MODULE.format(**fields))
        done = subprocess.run(
            [sys.executable, str(driver), str(src)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    out = run(offset=0, body="data + self.by + OFFSET")
    assert out["first"][0] == [["miss"], ["hit"]]
    assert out["second"][0] == [["miss"], ["hit"]]  # OFFSET rebound: not stale
    assert out["second"][1][0] == "code changed"
    assert out["third"][0] == [["miss"], ["hit"]]  # Shift(2) is not Shift(1)
    assert out["third"][1][0] == "constructor arguments changed"
    assert executions(counter) == 3

    out = run(offset=0, body="data * 2 + self.by + OFFSET")  # the method edited
    assert out["first"][0] == [["miss"], ["hit"]]
    # Compared with the last key stored for this step and input: Shift(2)'s.
    assert out["first"][1][0] == "constructor arguments changed; code changed"
    assert out["second"][1][0] == "code changed"
    assert executions(counter) == 6

    out = run(offset=0, body="data + self.by + OFFSET")  # back: every entry is still there
    assert [statuses[0] for statuses in (out["first"][0], out["second"][0], out["third"][0])] == [["hit"]] * 3
    assert executions(counter) == 6


def test_a_function_passed_as_a_parameter_is_keyed_by_its_code(tmp_path):
    # step(fn=helper): editing helper must miss; a lambda parameter is cached too.
    script = tmp_path / "fnparam.py"
    calls = tmp_path / "calls.txt"

    def write(body: str) -> None:
        script.write_text(
            "import sys\n"
            "from crystallize import Experiment, Pipeline, pipeline_step\n"
            "def helper(x):\n"
            f"    return {body}\n"
            "@pipeline_step(cacheable=True)\n"
            "def apply(data, *, fn):\n"
            f"    open({str(calls)!r}, 'a').write('call\\n')\n"
            "    return data, {'y': fn(data)}\n"
            "exp = Experiment(lambda ctx: 2, Pipeline([apply(fn=helper), apply(fn=lambda x: x - 1)]))\n"
            "print(exp.run().metrics.baseline.metrics['y'])\n"
        )

    def run() -> str:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    write("x + 1")
    assert run() == "[3, 1]"
    assert run() == "[3, 1]"
    assert calls.read_text().count("call") == 2  # second process: two hits
    write("x * 10")
    assert run() == "[20, 1]"  # helper edited: a miss
    assert calls.read_text().count("call") == 3  # the lambda's entry still hits
