"""ParallelExecution: runs on a local thread pool or process pool.

Threads share this process: the experiment's steps are set up once, here, and a
fixed set of daemon threads takes runs from the plan one at a time. The process
pool (``crystallize/_process_pool.py``) ships the experiment once per worker,
finds the run that kills its worker, stops runs that exceed ``timeout=``, replaces
workers after ``max_runs_per_worker=`` runs, and limits each worker's native thread
pools (BLAS, OpenMP) to its share of the CPUs, as joblib does.

On Ctrl-C both stop within about a second: no new run starts, the runs that come
back within a short grace are kept (``exc.partial_result`` holds them), process
workers are terminated, and a thread still inside a run is abandoned (it is a
daemon, so it never holds up the interpreter's exit; its result is dropped).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ._process_pool import run_in_processes
from .backend import (
    GRACE_SECONDS,
    WAIT_SLICE_SECONDS,
    ExecutionBackend,
    RunResult,
    RunSpec,
    SetUpSteps,
    check_option,
    is_int,
    is_seconds,
    steps_set_up,
)
from .errors import ConfigurationError

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
        timeout: seconds a run may take (process pool only). A run that exceeds it is
            recorded as a ``TimeoutError`` naming the step it was in and the line;
            its worker is killed and replaced, and the other runs go on. ``None``: no
            limit.
        max_runs_per_worker: replace each worker process after this many runs
            (process pool only), for steps that leak memory; its steps' ``teardown()``
            runs first and the new worker sets them up again. ``None``: never.

    On Ctrl-C ``run()`` raises ``KeyboardInterrupt`` within about a second, with
    every finished run in ``exc.partial_result``: runs not started are dropped,
    runs that finish within a short grace are kept, process workers are terminated
    (their steps' ``teardown()`` does not run) and threads take no new run.

    Raises:
        ConfigurationError: (a ``ValueError``) an option is out of range, naming it, or
            ``timeout``/``max_runs_per_worker`` is given for the thread pool, whose
            threads can be neither stopped nor replaced.

    Example:
        >>> backend = ParallelExecution(max_workers=2, executor_type="process", timeout=600,
        ...                             max_runs_per_worker=50)
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
        timeout: float | None = None,
        max_runs_per_worker: int | None = None,
    ) -> None:
        owner = "ParallelExecution"
        check_option(owner, "executor_type", executor_type, lambda v: v in _EXECUTORS, "'thread' or 'process'")
        check_option(owner, "max_workers", max_workers, lambda v: v is None or is_int(v, 1), "None or an integer >= 1")
        check_option(owner, "batch_size", batch_size, lambda v: v is None or is_int(v, 1), "None or an integer >= 1")
        check_option(owner, "max_retries", max_retries, lambda v: is_int(v, 0), "an integer >= 0")
        check_option(owner, "progress", progress, lambda v: isinstance(v, bool), "True or False")
        methods = multiprocessing.get_all_start_methods()
        check_option(
            owner, "start_method", start_method, lambda v: v is None or v in methods, f"None or one of {methods}"
        )
        check_option(
            owner,
            "threads_per_worker",
            threads_per_worker,
            lambda v: v is None or is_int(v, 1),
            "None or an integer >= 1",
        )
        check_option(owner, "timeout", timeout, lambda v: v is None or is_seconds(v), "None or a number of seconds > 0")
        check_option(
            owner,
            "max_runs_per_worker",
            max_runs_per_worker,
            lambda v: v is None or is_int(v, 1),
            "None or an integer >= 1",
        )
        if executor_type == "thread" and timeout is not None:
            raise ConfigurationError(
                owner,
                "timeout",
                timeout,
                "None with executor_type='thread': a thread cannot be stopped from outside, so an "
                "overdue run could not be ended. Use executor_type='process' (its worker is "
                "killed and replaced), or AsyncExecution(timeout=...) for async steps",
            )
        if executor_type == "thread" and max_runs_per_worker is not None:
            raise ConfigurationError(
                owner,
                "max_runs_per_worker",
                max_runs_per_worker,
                "None with executor_type='thread': threads share this process, so replacing one "
                "frees no memory. Use executor_type='process'",
            )
        self.timeout = timeout
        self.max_runs_per_worker = max_runs_per_worker
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

    @property
    def supports_timeout(self) -> bool:  # type: ignore[override]
        return self.executor_type == "process"

    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        if self.executor_type == "thread":
            return self._threads(experiment, plan)
        return self._processes(experiment, plan)

    # -- threads --------------------------------------------------------------
    def _threads(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        workers = min(self.max_workers or min(32, (os.cpu_count() or 1) + 4), max(1, len(plan)))
        with steps_set_up(experiment) as host:
            pool = _ThreadRuns(host, plan, workers)
            try:
                yield from pool.results()
            except KeyboardInterrupt:
                pool.stop()
                yield from pool.results(timeout=GRACE_SECONDS)
                raise
            finally:
                pool.stop()

    # -- processes ------------------------------------------------------------
    def _processes(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        return run_in_processes(
            experiment,
            plan,
            workers=self.max_workers or os.cpu_count() or 1,
            batch_size=self.batch_size,
            max_retries=self.max_retries,
            start_method=self.start_method,
            threads_per_worker=self.threads_per_worker,
            timeout=self.timeout,
            max_runs_per_worker=self.max_runs_per_worker,
        )


class _Raised:
    """What a worker thread raised (a bug in the runner, or a step's KeyboardInterrupt)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_EXITED = object()  # a worker thread's last message


class _ThreadRuns:
    """A fixed set of daemon threads, each taking the next run of the plan until none is left.

    Daemon threads, not a ``ThreadPoolExecutor``: after Ctrl-C a thread may still be
    inside a long run, and the interpreter must be able to exit without waiting for it.
    """

    def __init__(self, host: SetUpSteps, plan: Sequence[RunSpec], workers: int) -> None:
        self._host = host
        self._specs = iter(plan)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._alive = workers
        for i in range(workers):
            threading.Thread(target=self._work, name=f"crystallize-{i}", daemon=True).start()

    def _work(self) -> None:
        try:
            while not self._stopping.is_set():
                with self._lock:
                    spec = next(self._specs, None)
                if spec is None:
                    return
                self._inbox.put(self._host.run(spec.replicate, spec.condition))
        except BaseException as exc:  # re-raised in the driver
            self._inbox.put(_Raised(exc))
        finally:
            self._inbox.put(_EXITED)

    def results(self, timeout: float | None = None) -> Iterator[RunResult]:
        """Yield results until every thread has exited, or until ``timeout`` seconds passed.

        With a timeout (after :meth:`stop`), what a thread raised is dropped: the
        driver is already stopping.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._alive:
            wait = WAIT_SLICE_SECONDS if deadline is None else min(WAIT_SLICE_SECONDS, deadline - time.monotonic())
            if wait <= 0:
                return
            try:
                item = self._inbox.get(timeout=wait)
            except queue.Empty:
                continue
            if item is _EXITED:
                self._alive -= 1
            elif isinstance(item, _Raised):
                if deadline is None:
                    self.stop()
                    raise item.exc
            else:
                yield item

    def stop(self) -> None:
        """No thread starts another run; a run in progress finishes in the background."""
        self._stopping.set()
