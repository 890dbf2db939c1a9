"""The process pool behind ``ParallelExecution(executor_type="process")``.

The experiment travels once per worker process (the pool's initializer argument);
each task then carries only a batch of ``(replicate, condition)`` pairs. A worker
that dies takes the whole ``concurrent.futures`` pool down; the batches that were
in flight are then retried alone in a fresh pool, halving any batch that breaks it
again, so the run that kills its worker is found exactly and every other run
finishes.

On Ctrl-C nothing new starts, the batches that come back within a short grace
(``GRACE_SECONDS``) are kept, and every worker is terminated (then killed if it
lingers) before ``KeyboardInterrupt`` propagates; a second Ctrl-C does not cut that
short. Workers ignore SIGINT themselves: a terminal sends it to the whole process
group, and the driver alone decides what stops.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.util import Finalize
from typing import Any

from ._native import limit_native_threads
from .backend import (
    RunResult,
    RunSpec,
    batched,
    deserialize_experiment,
    pack_results,
    serialize_experiment,
    steps_set_up,
    unpack_results,
    worker_died,
)
from .errors import SerializationError
from .backend import GRACE_SECONDS, WAIT_SLICE_SECONDS

__all__ = ["ProcessRuns", "finish_despite_interrupts", "run_in_processes"]

#: How long terminated workers get to exit before they are killed.
_TERMINATE_SECONDS = 2.0


def run_in_processes(
    experiment: Any, plan: Sequence[RunSpec], *, workers: int, batch_size: int | None, max_retries: int,
    start_method: str | None, threads_per_worker: int | None,
) -> Iterator[RunResult]:
    """Yield one result per spec of ``plan``, computed on a process pool.

    Raises:
        SerializationError: the experiment cannot be pickled (before any work starts).
        KeyboardInterrupt: on Ctrl-C, after yielding the runs that finished in time
            and terminating the workers.
    """
    blob = serialize_experiment(experiment, backend="process")  # fails before any work
    method = start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(blob, threads))

    size = batch_size or max(1, min(256, len(plan) // (workers * 8)))
    runs = ProcessRuns(new_pool, batched(plan, size), workers=workers, max_retries=max_retries)
    try:
        while not runs.done:
            runs.advance()
            while runs.ready:
                yield runs.ready.popleft()
        runs.close()
    except KeyboardInterrupt:
        runs.interrupt()
        while runs.ready:
            yield runs.ready.popleft()
        raise
    finally:
        runs.stop()  # on any way out but the normal one; a no-op after close()


class ProcessRuns:
    """The batches of one ``run()`` and the pool they run on; results land in ``ready``.

    A pool that a dying worker broke is replaced by a fresh one on the next
    :meth:`advance`. The batches in flight when it broke become *suspects*, run one
    at a time: alone in the pool, a batch that breaks it surely holds a run that
    kills its worker, and halving it finds that run in a logarithmic number of pool
    restarts while the innocent runs complete.
    """

    def __init__(self, new_pool: Callable[[], ProcessPoolExecutor], batches: list[list[RunSpec]], *,
                 workers: int, max_retries: int) -> None:
        self._new_pool = new_pool
        self._workers = workers
        self._max_retries = max_retries
        self.queue: deque[list[RunSpec]] = deque(batches)
        self.suspects: deque[list[RunSpec]] = deque()
        self.attempts: Counter[RunSpec] = Counter()
        self.ready: deque[RunResult] = deque()
        self.running: dict[Future[bytes], tuple[list[RunSpec], bool]] = {}  # -> (batch, isolated)
        self.pool: ProcessPoolExecutor | None = None
        self._processes: dict[int, Any] = {}

    @property
    def done(self) -> bool:
        """Whether every batch has come back (its results may still be in ``ready``)."""
        return not (self.queue or self.suspects or self.running)

    def advance(self) -> None:
        """Submit what fits, then block until at least one batch is back (or the pool broke)."""
        if self.pool is None:
            self.pool = self._new_pool()
            # ProcessPoolExecutor.shutdown() drops its map of worker processes, which
            # stop() needs; keep the map itself (Python 3.14 has terminate_workers()).
            self._processes = self.pool._processes  # type: ignore[assignment]
        try:
            if self.suspects:
                if not self.running:
                    self._submit(self.suspects[0], isolated=True)
            else:
                while self.queue and len(self.running) < self._workers * 2:
                    self._submit(self.queue.popleft(), isolated=False)
            finished: set[Future[bytes]] = set()
            while not finished:
                finished, _ = wait(self.running, timeout=WAIT_SLICE_SECONDS, return_when=FIRST_COMPLETED)
            for future in finished:
                self._harvest(future)
        except BrokenProcessPool:
            self._broken()

    def close(self) -> None:
        """The normal end: idle workers exit by themselves and tear their steps down."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def interrupt(self) -> None:
        """Ctrl-C: start nothing new, keep what comes back within the grace, stop the workers."""
        try:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                deadline = time.monotonic() + GRACE_SECONDS
                while self.running:
                    finished, _ = wait(self.running, timeout=max(0.0, deadline - time.monotonic()),
                                       return_when=FIRST_COMPLETED)
                    if not finished:
                        break
                    for future in finished:
                        if future.cancelled() or future.exception() is not None:
                            del self.running[future]
                        else:
                            self._harvest(future)
        finally:
            self.stop()

    def stop(self) -> None:
        """Terminate every worker now, killing those that linger; idempotent."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        processes = list(self._processes.values())
        deadline = time.monotonic() + _TERMINATE_SECONDS

        def stop_all() -> None:
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_processes(processes, deadline)

        finish_despite_interrupts(stop_all)
        self.running.clear()

    # -- internals ------------------------------------------------------------
    def _submit(self, batch: list[RunSpec], *, isolated: bool) -> None:
        assert self.pool is not None
        self.running[self.pool.submit(_run_batch, batch)] = (batch, isolated)

    def _harvest(self, future: Future[bytes]) -> None:
        # Raises BrokenProcessPool if the batch's worker died, and whatever the task
        # raised otherwise (a worker that could not load the experiment).
        results = unpack_results(future.result())
        _, isolated = self.running.pop(future)
        if isolated:
            self.suspects.popleft()
            for run in results:
                run.attempts = self.attempts[RunSpec(run.replicate, run.condition)] + 1
        self.ready.extend(results)

    def _broken(self) -> None:
        """A worker died: every batch in flight that did not come back is a suspect."""
        for future, (batch, isolated) in list(self.running.items()):
            if future.done() and not future.cancelled() and future.exception() is None:
                self._harvest(future)  # it finished before the pool broke
                continue
            del self.running[future]
            if not isolated:
                self.attempts.update(batch)
                self.suspects.append(batch)
                continue
            self.suspects.popleft()
            if len(batch) > 1:
                half = len(batch) // 2
                self.suspects.extendleft([batch[half:], batch[:half]])
                continue
            (spec,) = batch
            self.attempts[spec] += 1
            if self.attempts[spec] > self._max_retries:
                self.ready.append(worker_died(spec, self.attempts[spec], "worker process exited abruptly"))
            else:
                self.suspects.appendleft(batch)
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # its workers are already gone; the next advance() starts afresh


def _stop_processes(processes: list[Any], deadline: float) -> None:
    """Terminate, wait until ``deadline``, kill what is left. Safe to call again."""
    for process in processes:
        if process.exitcode is None:
            process.terminate()
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.exitcode is None:
            process.kill()
            process.join(1.0)


def finish_despite_interrupts(action: Callable[[], None]) -> None:
    """Run ``action`` (idempotent) to its end even if Ctrl-C is pressed meanwhile.

    A Ctrl-C during ``action`` restarts it; the last one is re-raised afterwards. For
    the few steps that must not be cut short, such as stopping worker processes.
    """
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            action()
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


_WORKER: dict[str, Any] = {}


def _init_worker(blob: bytes, threads: int) -> None:
    # Ctrl-C in a terminal reaches every process of the foreground group; the driver
    # keeps what finished and stops the workers, so they leave SIGINT to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_native_threads(threads)
    try:
        experiment = deserialize_experiment(blob)
    except Exception as exc:
        # An initializer that raises breaks the pool, which looks like a crashed run
        # and is retried run by run. Keep the error for the first task to raise in
        # the driver instead.
        _WORKER["error"] = exc
        return
    except BaseException as exc:  # sys.exit() while unpickling must not end the driver too
        _WORKER["error"] = SerializationError(
            f"A worker process could not load the experiment: unpickling it raised "
            f"{type(exc).__name__}: {exc}. Check the __setstate__ or __reduce__ of the "
            f"experiment's steps and datasource, or run it under SerialExecution.")
        return
    setup = steps_set_up(experiment)
    # A failing setup() is kept by the host and recorded on every run.
    _WORKER["host"] = setup.__enter__()
    # Tear the steps down when this worker process exits normally.
    Finalize(experiment, setup.__exit__, args=(None, None, None), exitpriority=10)


def _run_batch(batch: list[RunSpec]) -> bytes:
    if "error" in _WORKER:
        raise _WORKER["error"]
    host = _WORKER["host"]
    return pack_results([host.run(spec.replicate, spec.condition) for spec in batch])
