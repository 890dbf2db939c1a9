"""The worker side of the process pool: one process that runs batches of runs.

A worker loads the experiment once, sets its steps up, then serves batches sent over
its pipe until told to stop (``None``), or until the driver is gone. It streams
results back as they finish (at least every ``FLUSH_SECONDS``), so a run that
finished is never held hostage by a long batch, and it keeps the driver informed
through a small shared array::

    state[0]  the batch being run (its sequence number)
    state[1]  the run's position in that batch; -1 between runs
    state[2]  when that run started (time.monotonic(), the same clock in every process)
    state[3]  the length of the report in ``report``; 0 when there is none
    state[4]  how far the run is: -2 treatment and hooks, -1 data source, k >= 0 in
              step k (k steps have recorded their provenance)

With ``timeout=``, the driver sends ``SIGUSR1`` to a worker whose run is overdue; the
handler, running in the stuck run's own thread, writes which step it is in and the
line (:func:`crystallize.backend.running_step`) to ``report``. A run stuck in native
code that holds the GIL cannot run the handler; then ``state[4]`` still names the
step. The driver kills the worker either way. Workers ignore SIGINT (a terminal sends
Ctrl-C to the whole process group; the driver alone decides what stops) and exit
when the driver dies.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from typing import Any

from ._native import limit_native_threads
from .backend import (
    RunSpec,
    deserialize_experiment,
    pack_results,
    running_step,
    steps_set_up,
)
from .errors import SerializationError
from .plugins import BasePlugin

__all__ = ["DRIVER_ENDS", "FLUSH_SECONDS", "REPORT_BYTES", "REPORT_SIGNAL", "read_report", "serve", "step_of"]

#: A worker sends finished runs back at least this often, and at the end of each batch.
FLUSH_SECONDS = 0.05
#: Room for a worker's answer to "where is your overdue run?".
REPORT_BYTES = 16384
#: The signal the driver sends to ask that question (None where there is none).
REPORT_SIGNAL = getattr(signal, "SIGUSR1", None)
#: The driver's ends of every worker's pipe: a forked worker closes its copies, or a
#: worker would keep its siblings' pipes open and none would see the driver die.
DRIVER_ENDS: set[Any] = set()
_PARENT_POLL_SECONDS = 0.5


def serve(conn: Any, blob: bytes, threads: int, state: Any, report: Any, stopping: Any) -> None:
    """The worker process's main function (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for inherited in list(DRIVER_ENDS):
        inherited.close()
    DRIVER_ENDS.clear()
    # The parent is the driver, or the forkserver that exits with it.
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="crystallize-orphan-watch", daemon=True).start()
    limit_native_threads(threads)
    try:
        experiment = deserialize_experiment(blob)
    except BaseException as exc:  # sys.exit() while unpickling must not end the driver too
        _send(conn, ("failed", _loading_error(exc)))
        return
    if REPORT_SIGNAL is not None:
        signal.signal(REPORT_SIGNAL, lambda signum, frame: _report(experiment, frame, state, report))
    experiment.plugins = [*experiment.plugins, _StepTracker(state)]  # last: after the other hooks
    setup = steps_set_up(experiment)
    host = setup.__enter__()  # a failing setup() is kept by the host and recorded on every run
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the driver is gone
                return
            if message is None:
                return
            seq, specs = message
            if not _run_batch(conn, host, seq, specs, state, stopping):
                return
    finally:
        setup.__exit__(None, None, None)


def _run_batch(conn: Any, host: Any, seq: int, specs: list[RunSpec], state: Any, stopping: Any) -> bool:
    """Run one batch, streaming results; ``False`` when the driver can no longer be told."""
    done: list[Any] = []
    sent_at = time.monotonic()
    last = len(specs) - 1
    try:
        for index, spec in enumerate(specs):
            if stopping.value:
                break
            state[0], state[2], state[4] = seq, time.monotonic(), -2
            state[1] = index  # last: the driver reads a position only with its start time
            run = host.run(spec.replicate, spec.condition)
            state[1] = -1
            done.append(run)
            now = time.monotonic()
            if index == last or now - sent_at >= FLUSH_SECONDS or stopping.value:
                # The flag tells the driver the batch is complete.
                if not _send(conn, ("runs", seq, pack_results(done), index == last)):
                    return False
                done, sent_at = [], now
    except BaseException as exc:  # a step raised KeyboardInterrupt itself: the driver stops
        state[1] = -1
        return _send(conn, ("runs", seq, pack_results(done), False)) and _send(conn, ("raised", exc))
    return not done or _send(conn, ("runs", seq, pack_results(done), False))  # stopped early


def _send(conn: Any, message: Any) -> bool:
    try:
        conn.send(message)
    except (OSError, ValueError):  # the driver is gone (a broken pipe)
        return False
    except Exception:  # an exception that cannot be pickled: send what it said
        return _send(conn, (message[0], RuntimeError(f"{type(message[1]).__name__}: {message[1]}")))
    return True


def _loading_error(exc: BaseException) -> Exception:
    if isinstance(exc, Exception):
        try:
            pickle.dumps(exc)
            return exc
        except Exception:
            pass
    return SerializationError(
        f"A worker process could not load the experiment: unpickling it raised "
        f"{type(exc).__name__}: {exc}. Check the __setstate__ or __reduce__ of the "
        f"experiment's steps and datasource, or run it under SerialExecution."
    )


def _report(experiment: Any, frame: Any, state: Any, report: Any) -> None:
    """SIGUSR1: write where the run in progress is, for the driver that will stop it."""
    try:
        step, line, stack = running_step(experiment, frame)
        data = json.dumps({"step": step, "line": line, "stack": stack}).encode()
        if len(data) > REPORT_BYTES:
            data = json.dumps({"step": step, "line": line, "stack": stack[-(REPORT_BYTES // 2) :]}).encode()
        report[: len(data)] = data
        state[3] = len(data)
    except Exception:  # the driver stops the worker all the same, naming no step
        pass


def read_report(state: Any, report: Any) -> dict[str, str]:
    """The driver's side of :func:`_report`: the answer, or ``{}`` if none came."""
    size = int(state[3])
    if size <= 0:
        return {}
    try:
        answer = json.loads(bytes(report[:size]))
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


class _StepTracker(BasePlugin):
    """Publishes how far each run is in ``state[4]``, readable even if the worker is stuck."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def before_replicate(self, experiment: Any, ctx: Any) -> None:
        ctx.provenance = _Steps(self.state, ctx.provenance)
        self.state[4] = -1


class _Steps(list):  # type: ignore[type-arg]
    """A run's provenance list that counts its steps into shared memory as they record."""

    def __init__(self, state: Any, records: Any) -> None:
        super().__init__(records)
        self._state = state

    def append(self, record: Any) -> None:
        super().append(record)
        self._state[4] = len(self)

    def __reduce__(self) -> Any:  # travels back as the plain list it is
        return (list, (list(self),))


def step_of(state: Any, names: list[str]) -> str:
    """The driver's side of :class:`_StepTracker`: the step a stuck worker's run is in."""
    done = int(state[4])
    if done == -1:
        return "datasource"
    return names[done] if 0 <= done < len(names) else "run"


def _exit_with(parent: int) -> None:
    """Exit when the driver dies (``kill -9``): nobody would receive what runs here."""
    while True:
        time.sleep(_PARENT_POLL_SECONDS)
        if os.getppid() != parent:
            os._exit(0)
