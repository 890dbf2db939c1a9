"""What runs inside a Ray worker process: the loaded experiment, and the task body.

A worker deserializes each ``run()``'s experiment once (keyed by the object reference),
sets its steps up once — all but the heavy ones, which live in their actor pools and
are called through routers (see :mod:`crystallize_ray._router`) — and reuses it for
every task of that ``run()``. It keeps one experiment: when a task of another ``run()``
arrives, the previous experiment's steps are torn down first, so nothing a worker
loaded outlives the next ``run()``; at process exit the last one is torn down too.

A batch of runs executes one after another, or — when the pipeline has async steps or
pooled (heavy) steps, whose calls are waits — as coroutines sharing this worker's
event loop, at most ``max_concurrency`` at once.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from crystallize import SerializationError
from crystallize.backend import (
    RunResult,
    RunSpec,
    deserialize_experiment,
    is_interrupt,
    pack_results,
    running_step,
    steps_set_up,
)

from ._router import PoolHandle, router

log = logging.getLogger("crystallize_ray")

__all__ = ["Job", "make_task", "run_batch", "spec_pairs"]


@dataclass(frozen=True)
class Job:
    """What every task of one ``run()`` shares; travels once, in the task's closure.

    Attributes:
        holder: ``[ObjectRef of the serialized experiment]``. A list, so Ray does not
            resolve the reference when the closure is exported.
        pools: step index -> its pool's handle.
        retry_errors: how often a run whose step raised is run again.
        overlap: run a batch's runs as coroutines in one event loop.
        max_concurrency: the most runs of a batch in flight at once when overlapping.
        timeout: seconds per run, or ``None``.
        board: the timeout board actor (see :mod:`crystallize_ray._deadlines`).
        max_calls: tasks this worker runs before Ray replaces it (``None``: no limit).
    """

    holder: list[Any]
    pools: dict[int, PoolHandle] = field(default_factory=dict)
    retry_errors: int = 0
    overlap: bool = False
    max_concurrency: int = 64
    timeout: float | None = None
    board: Any = None
    max_calls: int | None = None


_LOADED: dict[str, tuple[Any, Any]] = {}  # at most one: ref hex -> (host, its context manager)
_CALLS: dict[str, int] = {}  # tasks run per run() (Ray's max_calls counts per task function)


def _experiment(job: Job) -> Any:
    ref = job.holder[0]
    key = ref.hex()
    if key in _LOADED:
        return _LOADED[key][0]
    import ray

    _teardown_all()  # another run()'s steps: gone before this one's load
    try:
        experiment = deserialize_experiment(ray.get(ref))
    except BaseException as exc:
        if isinstance(exc, Exception) or is_interrupt(exc):
            raise
        # sys.exit() while unpickling would take the worker down and look like a
        # crash, retried again and again; it fails this task's runs instead.
        raise SerializationError(
            f"A Ray worker could not load the experiment: unpickling it raised "
            f"{type(exc).__name__}: {exc}. Check the __setstate__ or __reduce__ of the "
            f"experiment's steps and datasource, or run it under SerialExecution."
        ) from exc
    invokers = {index: router(handle).invoke for index, handle in job.pools.items()}
    setup = steps_set_up(experiment, invokers)
    host = setup.__enter__()  # a failing setup() is recorded on every run by the host
    _LOADED[key] = (host, setup)
    return host


def _tear_down(setup: Any) -> None:
    """Tear an experiment's steps down; nothing it raises reaches the task."""
    try:
        setup.__exit__(None, None, None)
    except BaseException as exc:  # even sys.exit(): this task's own runs are unaffected
        if is_interrupt(exc):
            raise
        log.exception("Tearing down an experiment's steps in a Ray worker failed")


def make_task(job: Job) -> Any:
    """The task body for one ``run()``: a closure over ``job``.

    ``job`` travels with the function definition, which Ray exports once per
    ``run()``; each task then carries only its ``(replicate, condition)`` pairs (and
    an id when runs have a timeout), and no argument refers to the object store
    (which measurably slows every task).
    """

    def crystallize_runs(batch: list[tuple[int, str]], batch_id: int = 0) -> bytes:
        return run_batch(job, batch, batch_id)

    return crystallize_runs


def run_batch(job: Job, batch: list[tuple[int, str]], batch_id: int = 0) -> bytes:
    """Execute a batch of runs of ``job``'s experiment; their results, packed.

    Returns the results packed by ``pack_results``: bytes are the cheapest thing
    for Ray to move, and a result that cannot be pickled fails only its own run.
    """
    host = _experiment(job)
    if job.overlap and len(batch) > 1:
        results = asyncio.run(_overlapped(host, job, batch))
    else:
        results = [_one(host, job, replicate, condition, batch_id) for replicate, condition in batch]
    packed = pack_results(results)
    if job.max_calls is not None:
        key = job.holder[0].hex()
        _CALLS[key] = _CALLS.get(key, 0) + 1
        if _CALLS[key] >= job.max_calls:
            _teardown_all()  # Ray ends this worker after this task: tear down first
    return packed


def _one(host: Any, job: Job, replicate: int, condition: str, batch_id: int) -> RunResult:
    with _deadline(host, job, replicate, condition, batch_id):
        run = host.run(replicate, condition)
        tries = 1
        while run.error is not None and tries <= job.retry_errors:
            run = host.run(replicate, condition)
            tries += 1
    run.attempts = tries
    return run


async def _overlapped(host: Any, job: Job, batch: list[tuple[int, str]]) -> list[RunResult]:
    gate = asyncio.Semaphore(job.max_concurrency)

    async def one(replicate: int, condition: str) -> RunResult:
        async with gate:
            run = await host.arun(replicate, condition)
            tries = 1
            while run.error is not None and tries <= job.retry_errors:
                run = await host.arun(replicate, condition)
                tries += 1
            run.attempts = tries
            return run

    return list(await asyncio.gather(*(one(r, c) for r, c in batch)))


class _deadline:
    """While a run executes: when it passes ``job.timeout``, tell the driver where it is.

    SIGALRM interrupts the run in this (the main) thread; the handler reads which step
    the run is in (:func:`crystallize.backend.running_step`) and hands it to a thread
    that reports it to the timeout board. The driver then cancels the task, which
    kills this worker: the run never returns from here. Off the main thread (where
    signals cannot be handled) nothing is armed and the board's own clock applies.
    """

    def __init__(self, host: Any, job: Job, replicate: int, condition: str, batch_id: int) -> None:
        self.host, self.job, self.run = host, job, (replicate, condition)
        self.batch_id = batch_id
        self.armed = False

    def __enter__(self) -> None:
        job = self.job
        if job.timeout is None or job.board is None:
            return
        job.board.started.remote(self.batch_id, self.run)
        if threading.current_thread() is not threading.main_thread():
            return
        experiment = self.host.experiment

        def expired(signum: int, frame: Any) -> None:
            step, line, stack = running_step(experiment, frame)
            _REPORTS.put((job.board, self.batch_id, self.run, step, line, stack))

        self.previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, job.timeout)
        self.armed = True
        _reporter()

    def __exit__(self, *exc: Any) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


_REPORTS: queue.Queue[tuple[Any, ...]] = queue.Queue()
_REPORTER: list[threading.Thread] = []


def _reporter() -> None:
    """Start the thread that sends expiry reports (a signal handler should not call Ray)."""
    if _REPORTER:
        return

    def send() -> None:
        while True:
            board, batch_id, run, step, line, stack = _REPORTS.get()
            try:
                board.expired.remote(batch_id, run, step, line, stack)
            except Exception as exc:  # the board's own clock still applies
                print(f"crystallize: could not report a timed-out run: {exc}", file=sys.stderr)

    thread = threading.Thread(target=send, name="crystallize-timeouts", daemon=True)
    thread.start()
    _REPORTER.append(thread)


def spec_pairs(specs: list[RunSpec]) -> list[tuple[int, str]]:
    """Plain tuples are the cheapest thing to ship per task."""
    return [(s.replicate, s.condition) for s in specs]


@atexit.register
def _teardown_all() -> None:
    while _LOADED:
        _, (_, setup) = _LOADED.popitem()
        _tear_down(setup)
