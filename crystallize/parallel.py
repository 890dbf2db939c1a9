"""ParallelExecution: runs on a local thread pool or process pool.

The process pool receives the experiment once per worker process (as the pool's
initializer argument); each task then carries only a batch of (replicate,
condition) pairs. A step that raises is recorded in its run. A worker process that
dies takes down the whole pool in ``concurrent.futures``; the runs that were in
flight are then retried in isolation in a fresh pool, batch by batch, halving any
batch that breaks the pool again: the run that kills its worker is identified
exactly, retried up to ``max_retries`` times, and recorded as failed while every
other run finishes. A run whose result cannot be pickled back
is recorded as failed too; a step whose ``setup()`` fails in a worker is recorded
on every run, as under the serial backend.

Each process worker limits the native thread pools (BLAS, OpenMP) it inherits to
its share of the CPUs, as joblib does: two workers on two cores each running
numpy with two BLAS threads would otherwise fight over the cores.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.util import Finalize
from typing import Any

from ._native import limit_native_threads
from .backend import (
    ExecutionBackend,
    RunResult,
    RunSpec,
    batched,
    check_option,
    deserialize_experiment,
    is_int,
    pack_results,
    serialize_experiment,
    steps_set_up,
    unpack_results,
    worker_died,
)

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
        threads_per_worker: native threads (BLAS, OpenMP) each process worker may
            use; default its share of the CPUs (``cpus // max_workers``, at least 1).

    Raises:
        ConfigurationError: (a ``ValueError``) an option is out of range, naming it.

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
        threads_per_worker: int | None = None,
    ) -> None:
        owner = "ParallelExecution"
        check_option(owner, "executor_type", executor_type, lambda v: v in _EXECUTORS,
                     "'thread' or 'process'")
        check_option(owner, "max_workers", max_workers, lambda v: v is None or is_int(v, 1),
                     "None or an integer >= 1")
        check_option(owner, "batch_size", batch_size, lambda v: v is None or is_int(v, 1),
                     "None or an integer >= 1")
        check_option(owner, "max_retries", max_retries, lambda v: is_int(v, 0), "an integer >= 0")
        check_option(owner, "progress", progress, lambda v: isinstance(v, bool), "True or False")
        methods = multiprocessing.get_all_start_methods()
        check_option(owner, "start_method", start_method, lambda v: v is None or v in methods,
                     f"None or one of {methods}")
        check_option(owner, "threads_per_worker", threads_per_worker,
                     lambda v: v is None or is_int(v, 1), "None or an integer >= 1")
        self.threads_per_worker = threads_per_worker
        self.max_workers = max_workers
        self.executor_type = executor_type
        self.progress = progress
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.start_method = start_method

    @property
    def ships_experiment(self) -> bool:  # type: ignore[override]
        return self.executor_type == "process"

    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        if self.executor_type == "thread":
            return self._threads(experiment, plan)
        return self._processes(experiment, plan)

    # -- threads --------------------------------------------------------------
    def _threads(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        workers = self.max_workers or min(32, (os.cpu_count() or 1) + 4)
        specs = iter(plan)
        with steps_set_up(experiment) as host, ThreadPoolExecutor(workers, thread_name_prefix="crystallize") as pool:
            running: set[Future[RunResult]] = set()
            while True:
                for spec in specs:  # keep a bounded number of runs in flight
                    running.add(pool.submit(host.run, spec.replicate, spec.condition))
                    if len(running) >= workers * 4:
                        break
                if not running:
                    return
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()

    # -- processes ------------------------------------------------------------
    def _processes(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        blob = serialize_experiment(experiment, backend="process")  # fails before any work
        workers = self.max_workers or os.cpu_count() or 1
        size = self.batch_size or max(1, min(256, len(plan) // (workers * 8)))
        queue: deque[list[RunSpec]] = deque(batched(plan, size))
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
        threads = self.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        return ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method),
            initializer=_init_worker, initargs=(blob, threads),
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


def _init_worker(blob: bytes, threads: int) -> None:
    limit_native_threads(threads)
    try:
        experiment = deserialize_experiment(blob)
    except Exception as exc:
        # An initializer that raises breaks the pool, which looks like a crashed run
        # and is retried run by run. Keep the error for the first task to raise in
        # the driver instead.
        _WORKER["error"] = exc
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
