"""Counting real executions of a step, in this process and in workers.

A test points ``CRYSTALLIZE_TEST_COUNTER`` at a file (:func:`start_counting`, from an
autouse fixture); a step calls :func:`count_call`, which appends one line with its
process id, so executions in process pools and Ray workers count too; the test reads
the count back with :func:`executions`. :class:`Lifecycle` logs a step's set-ups,
tear-downs and calls the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crystallize import PipelineStep

COUNTER_ENV = "CRYSTALLIZE_TEST_COUNTER"


def start_counting(tmp_path: Path, monkeypatch: Any) -> Path:
    """Count into a fresh file under ``tmp_path``; returns the file."""
    path = tmp_path / "calls.txt"
    monkeypatch.setenv(COUNTER_ENV, str(path))
    return path


def executions(path: Path) -> int:
    """How many executions ``path`` has counted."""
    return len(path.read_text().splitlines()) if path.exists() else 0


def count_call() -> int:
    """Count one execution; return how many there were before it."""
    path = Path(os.environ[COUNTER_ENV])
    before = executions(path)
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return before


class Lifecycle(PipelineStep):
    """Logs setup, teardown and calls, one ``what pid`` line each, to the file ``log``."""

    def __init__(self, log: str) -> None:
        self.log = log

    def _note(self, what: str) -> None:
        with open(self.log, "a") as fh:
            fh.write(f"{what} {os.getpid()}\n")

    def setup(self, ctx):
        self._note("setup")

    def teardown(self, ctx):
        self._note("teardown")

    def __call__(self, data, ctx):
        self._note("call")
        return data
