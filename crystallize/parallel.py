"""ParallelExecution: runs on a local thread pool or process pool.

The process pool receives the experiment once per worker process (as the pool's
initializer argument); each task then carries only a batch of (replicate,
condition) pairs. A step that raises is recorded in its run. A worker process that
dies takes down the whole pool in ``concurrent.futures``; the runs that were in
flight are then retried in isolation in a fresh pool, batch by batch, halving any
batch that breaks the pool again: the run that kills its worker is identified
exactly, retried up to ``max_retries`` times, and recorded as failed while every
other run finishes. A run whose result cannot be pickled back
is recorded as failed too; a step whose ``setup()`` fails in a worker fails
``run()`` with that error, as under the serial backend.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.util import Finalize
from typing import TYPE_CHECKING, Any

from .execution import ExecutionBackend
from .result import RunResult
from .runner import RunSpec, execute_run, steps_set_up, worker_died
from .serialization import deserialize_experiment, pack_results, serialize_experiment, unpack_results

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = ["ParallelExecution"]

_EXECUTORS = ("thread", "process")


class ParallelExecution(ExecutionBackend):
    """Run runs in parallel on a thread or process pool.

    Args:
        max_workers: pool size; default: the number of CPUs (threads: CPUs + 4).
        executor_type: ``"thread"`` (shares the process; fine for I/O and for
            numpy-heavy steps that release the GIL) or ``"process"`` (true CPU
            parallelism; the experiment must be picklable).
        progress: show a progress line over runs.
        batch_size: runs per process task; default sizes batches so each worker
            gets about eight, which amortizes task overhead for tiny runs.
        max_retries: how often a run whose worker process died is retried.
        start_method: multiprocessing start method; default ``fork`` where
            available (scripts without an ``if __name__ == "__main__"`` guard work),
            else ``spawn``.

    Example:
        >>> backend = ParallelExecution(max_workers=2, executor_type="process")
    """

    def __init__(
        self,
        max_workers: int | None = None,
        executor_type: str = "thread",
        progress: bool = False,
        *,
        batch_size: int | None = None,
        max_retries: int = 2,
        start_method: str | None = None,
    ) -> None:
        if executor_type not in _EXECUTORS:
            raise ValueError(
                f"ParallelExecution(executor_type={executor_type!r}): use 'thread' or 'process'."
            )
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"ParallelExecution(max_workers={max_workers}) must be >= 1.")
        self.max_workers = max_workers
        self.executor_type = executor_type
        self.progress = progress
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.start_method = start_method

    def execute(self, experiment: Experiment, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        if self.executor_type == "thread":
            return self._threads(experiment, plan)
        return self._processes(experiment, plan)

    # -- threads --------------------------------------------------------------
    def _threads(self, experiment: Experiment, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        workers = self.max_workers or min(32, (os.cpu_count() or 1) + 4)
        specs = iter(plan)
        with steps_set_up(experiment), ThreadPoolExecutor(workers, thread_name_prefix="crystallize") as pool:
            running: set[Future[RunResult]] = set()
            while True:
                for spec in specs:  # keep a bounded number of runs in flight
                    running.add(pool.submit(execute_run, experiment, spec.replicate, spec.condition))
                    if len(running) >= workers * 4:
                        break
                if not running:
                    return
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()

    # -- processes ------------------------------------------------------------
    def _processes(self, experiment: Experiment, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        blob = serialize_experiment(experiment, backend="process")  # fails before any work
        workers = self.max_workers or os.cpu_count() or 1
        size = self.batch_size or max(1, min(256, len(plan) // (workers * 8)))
        queue: deque[list[RunSpec]] = deque(list(plan[i:i + size]) for i in range(0, len(plan), size))
        suspects: deque[list[RunSpec]] = deque()
        attempts: Counter[RunSpec] = Counter()
        while queue or suspects:
            with self._pool(blob, workers) as pool:
                try:
                    yield from self._isolate(pool, suspects, attempts)
                    yield from self._stream(pool, queue, suspects, attempts, workers)
                except BrokenProcessPool:
                    continue

    def _pool(self, blob: bytes, workers: int) -> ProcessPoolExecutor:
        method = self.start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        return ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method),
            initializer=_init_worker, initargs=(blob,),
        )

    def _stream(
        self,
        pool: ProcessPoolExecutor,
        queue: deque[list[RunSpec]],
        suspects: deque[list[RunSpec]],
        attempts: Counter[RunSpec],
        workers: int,
    ) -> Iterator[RunResult]:
        running: dict[Future[bytes], list[RunSpec]] = {}
        try:
            while queue or running:
                while queue and len(running) < workers * 2:
                    future = pool.submit(_run_batch, queue[0])
                    running[future] = queue.popleft()
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    results = unpack_results(future.result())  # raises BrokenProcessPool if a worker died
                    del running[future]
                    yield from results
        except BrokenProcessPool:
            # Every batch in flight failed with the pool; which run killed it is
            # unknown, so those batches are retried in isolation (see _isolate).
            for batch in running.values():
                attempts.update(batch)
                suspects.append(batch)
            raise

    def _isolate(
        self, pool: ProcessPoolExecutor, suspects: deque[list[RunSpec]], attempts: Counter[RunSpec]
    ) -> Iterator[RunResult]:
        """Run suspect batches one at a time, halving any that kills its worker.

        Alone in the pool, a batch that breaks it surely holds a run that kills its
        worker; halving finds that run in a logarithmic number of pool restarts
        while the innocent runs of the batch complete.
        """
        while suspects:
            group = suspects[0]
            try:
                runs = unpack_results(pool.submit(_run_batch, group).result())
            except BrokenProcessPool:
                suspects.popleft()
                if len(group) > 1:
                    half = len(group) // 2
                    suspects.extendleft([group[half:], group[:half]])
                    raise
                (spec,) = group
                attempts[spec] += 1
                if attempts[spec] > self.max_retries:
                    yield worker_died(spec, attempts[spec], "worker process exited abruptly")
                else:
                    suspects.appendleft(group)
                raise
            suspects.popleft()
            for run in runs:
                run.attempts = attempts[RunSpec(run.replicate, run.condition)] + 1
                yield run


_WORKER: dict[str, Any] = {}


def _init_worker(blob: bytes) -> None:
    try:
        experiment = deserialize_experiment(blob)
        setup = steps_set_up(experiment)
        setup.__enter__()
    except Exception as exc:
        # An initializer that raises breaks the pool, which looks like a crashed run
        # and is retried run by run. Keep the error for the first task to raise in
        # the driver instead, as a failing setup() does under the serial backend.
        _WORKER["error"] = exc
        return
    # Tear the steps down when this worker process exits normally.
    Finalize(experiment, setup.__exit__, args=(None, None, None), exitpriority=10)
    _WORKER["experiment"] = experiment


def _run_batch(batch: list[RunSpec]) -> bytes:
    if "error" in _WORKER:
        raise _WORKER["error"]
    experiment = _WORKER["experiment"]
    return pack_results([execute_run(experiment, spec.replicate, spec.condition) for spec in batch])
