"""The process pool behind ``ParallelExecution(executor_type="process")``: the driver's side.

The pool is ours rather than ``concurrent.futures``': each worker has its own pipe
and a small shared array saying which run it is in and since when (the worker's side
is ``crystallize/_process_worker.py``). So the driver knows, for every worker:

* which run it is executing: a worker that dies is replaced, the run it died in is
  retried alone (and recorded as a ``WorkerCrashedError`` after ``max_retries``
  deaths), and every other run it held is simply run again elsewhere;
* how long that run has taken: with ``timeout=``, an overdue run's worker is asked
  where it is (a signal; it writes the step and line), killed and replaced; the run
  is recorded as a ``TimeoutError`` naming the step, and the other runs go on;
* how many runs it has served: with ``max_runs_per_worker=``, a worker that reached
  the limit is told to exit (its steps are torn down) and a fresh one takes its place,
  so a step that leaks memory cannot grow one process without bound.

The experiment travels once per worker (the process's start arguments); a batch
carries only ``(replicate, condition)`` pairs, and results stream back as runs finish.

On Ctrl-C nothing new starts (workers see a shared flag before each run), the runs
that come back within ``GRACE_SECONDS`` are kept, and every worker is terminated
(then killed if it lingers) before ``KeyboardInterrupt`` propagates; a second Ctrl-C
does not cut that short.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from typing import Any

from ._process_worker import (
    DRIVER_ENDS,
    REPORT_BYTES,
    REPORT_SIGNAL,
    read_report,
    serve,
    step_of,
)
from .backend import (
    GRACE_SECONDS,
    WAIT_SLICE_SECONDS,
    RunResult,
    RunSpec,
    serialize_experiment,
    timed_out,
    unpack_results,
    worker_died,
)

__all__ = ["ProcessRuns", "finish_despite_interrupts", "run_in_processes"]

#: How long terminated workers get to exit before they are killed.
_TERMINATE_SECONDS = 2.0
#: How long a worker asked where its overdue run is may take to answer before it is killed.
_REPORT_SECONDS = 1.0
#: Batches sent ahead to each worker, so it never waits for the driver between batches.
_QUEUED = 2


def run_in_processes(
    experiment: Any,
    plan: Sequence[RunSpec],
    *,
    workers: int,
    batch_size: int | None,
    max_retries: int,
    start_method: str | None,
    threads_per_worker: int | None,
    timeout: float | None = None,
    max_runs_per_worker: int | None = None,
) -> Iterator[RunResult]:
    """Yield one result per spec of ``plan``, computed on a pool of worker processes.

    Raises:
        SerializationError: the experiment cannot be pickled (before any work starts).
        KeyboardInterrupt: on Ctrl-C, after yielding the runs that finished in time
            and terminating the workers.
    """
    blob = serialize_experiment(experiment, backend="process")  # fails before any work
    method = start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    if method == "fork":
        _preload_for_workers()
    size = batch_size or max(1, min(256, len(plan) // (workers * 8)))
    runs = ProcessRuns(
        multiprocessing.get_context(method),
        blob,
        threads,
        plan,
        workers=workers,
        size=size,
        max_retries=max_retries,
        timeout=timeout,
        max_runs=max_runs_per_worker,
        steps=[step.name for step in experiment.pipeline.steps],
    )
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


class _Batch:
    __slots__ = ("back", "seq", "specs")

    def __init__(self, seq: int, specs: list[RunSpec]) -> None:
        self.seq, self.specs, self.back = seq, specs, 0  # back: how many results came back


class _Worker:
    """One worker process: its pipe, its shared state and the batches it holds."""

    def __init__(self, mp: Any, blob: bytes, threads: int, stopping: Any) -> None:
        self.conn, theirs = mp.Pipe()
        self.state = mp.RawArray("d", 5)  # see crystallize/_process_worker.py
        self.state[1] = -1
        self.report = mp.RawArray("c", REPORT_BYTES)
        self.process = mp.Process(
            target=serve,
            name="crystallize-worker",
            daemon=False,
            args=(theirs, blob, threads, self.state, self.report, stopping),
        )
        DRIVER_ENDS.add(self.conn)
        try:
            self.process.start()
        finally:
            theirs.close()
        self.batches: deque[_Batch] = deque()
        self.served = 0  # runs sent to it
        self.asked: tuple[float, float, float] | None = None  # (when, batch, position) of a timeout question

    def running(self) -> tuple[int, int, float] | None:
        """``(batch, position, started)`` of the run it is executing, or ``None``."""
        position = self.state[1]
        batch, started = self.state[0], self.state[2]
        if position < 0 or self.state[1] != position:  # between runs, or it just moved on
            return None
        return int(batch), int(position), started

    def close(self) -> None:
        DRIVER_ENDS.discard(self.conn)
        self.conn.close()


class ProcessRuns:
    """The runs of one ``run()`` and the workers they run on; results land in ``ready``."""

    def __init__(
        self,
        mp: Any,
        blob: bytes,
        threads: int,
        plan: Sequence[RunSpec],
        *,
        workers: int,
        size: int,
        max_retries: int,
        timeout: float | None,
        max_runs: int | None,
        steps: Sequence[str] = (),
    ) -> None:
        self._stopping = mp.RawValue("b", 0)  # set on Ctrl-C: workers start no new run
        self._start = lambda: _Worker(mp, blob, threads, self._stopping)
        self._steps = list(steps)
        self._most = max(1, min(workers, -(-len(plan) // size)))
        self._size = size if max_runs is None else min(size, max_runs)
        self._max_retries, self._timeout, self._max_runs = max_retries, timeout, max_runs
        self.todo: deque[RunSpec] = deque(plan)
        self.retry: deque[RunSpec] = deque()  # runs a worker died in, each run again alone
        self.deaths: Counter[RunSpec] = Counter()
        self.ready: deque[RunResult] = deque()
        self.workers: list[_Worker] = []
        self.leaving: list[_Worker] = []  # told to exit; joined at the end
        self._seq = 0

    @property
    def done(self) -> bool:
        """Whether every run has come back (its result may still be in ``ready``)."""
        return not (self.todo or self.retry or any(w.batches for w in self.workers))

    def advance(self) -> None:
        """Hand out work, then wait (a slice at most) for results, deaths and overdue runs."""
        self._assign()
        owners = {w.conn: w for w in self.workers}
        owners.update({w.process.sentinel: w for w in self.workers})
        for ready in wait(list(owners), timeout=self._wait_slice()):
            if owners[ready] in self.workers:  # not lost while an earlier one was drained
                self._drain(owners[ready])
        if self._timeout is not None:
            self._enforce_timeout()

    def close(self) -> None:
        """The normal end: workers exit by themselves and tear their steps down."""
        for worker in list(self.workers):
            self._retire(worker)
        for worker in self.leaving:
            while worker.process.exitcode is None:
                worker.process.join(WAIT_SLICE_SECONDS)  # short waits: Ctrl-C is noticed
            worker.close()
        self.leaving = []

    def interrupt(self) -> None:
        """Ctrl-C: start nothing new, keep what comes back within the grace, stop the workers."""
        try:
            self._stopping.value = 1
            deadline = time.monotonic() + GRACE_SECONDS
            while any(w.batches for w in self.workers) and (left := deadline - time.monotonic()) > 0:
                owners = {w.conn: w for w in self.workers if w.batches}
                for ready in wait(list(owners), timeout=left):
                    try:
                        self._drain(owners[ready], retry=False)
                    except Exception:  # what a worker raised no longer matters: we are stopping
                        owners[ready].batches.clear()
        finally:
            self.stop()

    def stop(self) -> None:
        """Terminate every worker now, killing those that linger; idempotent."""
        workers, self.workers, self.leaving = self.workers + self.leaving, [], []
        if not workers:
            return
        deadline = time.monotonic() + _TERMINATE_SECONDS
        finish_despite_interrupts(lambda: _stop_processes([w.process for w in workers], deadline))
        for worker in workers:
            worker.close()

    # -- handing out work -----------------------------------------------------
    def _assign(self) -> None:
        for worker in list(self.workers):
            if self._max_runs is not None and worker.served >= self._max_runs and not worker.batches:
                self._retire(worker)  # it served its runs: a fresh process takes its place
        while len(self.workers) < self._most and (self.todo or self.retry):
            self.workers.append(self._start())
        # Round by round, so every worker has a batch before any gets a second; and a
        # second only while plenty is left: a batch queued behind a long run cannot move
        # to a worker that falls idle, which would stretch the tail of the run.
        plenty = len(self.todo) >= _QUEUED * len(self.workers) * self._size
        for depth in range(_QUEUED if plenty else 1):
            for worker in self.workers:
                if len(worker.batches) > depth or not (self.todo or self.retry):
                    continue
                room = self._size if self._max_runs is None else min(self._size, self._max_runs - worker.served)
                if room <= 0:
                    continue
                if self.retry:  # alone, so a second death is surely its own
                    if worker.batches:
                        continue
                    specs = [self.retry.popleft()]
                else:
                    specs = [self.todo.popleft() for _ in range(min(room, len(self.todo)))]
                self._send(worker, specs)

    def _send(self, worker: _Worker, specs: list[RunSpec]) -> None:
        self._seq += 1
        worker.batches.append(_Batch(self._seq, specs))
        worker.served += len(specs)
        try:
            worker.conn.send((self._seq, specs))
        except OSError:  # it died: its sentinel is ready, and its runs are handed out again
            pass

    def _retire(self, worker: _Worker) -> None:
        try:
            worker.conn.send(None)
        except OSError:
            pass
        if worker in self.workers:
            self.workers.remove(worker)
        self.leaving.append(worker)

    def _wait_slice(self) -> float:
        if self._timeout is None:
            return WAIT_SLICE_SECONDS
        now, soonest = time.monotonic(), WAIT_SLICE_SECONDS
        for worker in self.workers:
            if worker.asked is not None:
                return 0.02  # an answer is due
            running = worker.running()
            if running is not None:
                soonest = min(soonest, running[2] + self._timeout - now)
        return max(0.0, soonest)

    # -- results, deaths, timeouts --------------------------------------------
    def _drain(self, worker: _Worker, *, retry: bool = True) -> None:
        """Receive everything ``worker`` sent; if it died, hand its runs out again."""
        try:
            while worker.conn.poll():
                self._receive(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass
        else:
            if worker.process.exitcode is None:
                return
        worker.process.join()
        self._lost(worker, retry=retry)

    def _receive(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "runs":
            _, seq, packed, complete = message
            batch = worker.batches[0]
            assert batch.seq == seq, f"batch {seq} came back while {batch.seq} was expected"
            results = unpack_results(packed)
            if self.deaths:  # only runs retried after their worker died were attempted more than once
                for run in results:
                    spec = RunSpec(run.replicate, run.condition)
                    if spec in self.deaths:
                        run.attempts = self.deaths[spec] + 1
            batch.back += len(results)
            self.ready.extend(results)
            if complete:
                worker.batches.popleft()
        else:  # "raised" (a step raised KeyboardInterrupt itself) or "failed" (no experiment)
            raise message[1]

    def _lost(
        self, worker: _Worker, *, retry: bool = True, blame: bool = True, stopped: RunResult | None = None
    ) -> None:
        """``worker`` is gone: the run it died in is a suspect, its other runs run again.

        Args:
            retry: hand its runs out again (``False`` while stopping).
            blame: it died by itself, so the run it was in counts a death.
            stopped: the record of the run it was killed in (a timeout).
        """
        if worker in self.workers:
            self.workers.remove(worker)
        worker.close()
        running = worker.running() if blame else None
        culprit = None
        again: list[RunSpec] = []
        for batch in worker.batches:
            left = batch.specs[batch.back :]
            if blame and culprit is None and left:
                # The run it was in (or, if it died between runs, the next one) is blamed.
                at = running[1] if running is not None and running[0] == batch.seq else batch.back
                culprit = batch.specs[max(at, batch.back)]
            again.extend(
                spec
                for spec in left
                if spec != culprit and (stopped is None or spec != RunSpec(stopped.replicate, stopped.condition))
            )
        worker.batches.clear()
        if not retry:
            return
        if stopped is not None:
            self.ready.append(stopped)
        if culprit is not None:
            self.deaths[culprit] += 1
            if self.deaths[culprit] > self._max_retries:
                self.ready.append(worker_died(culprit, self.deaths[culprit], "worker process exited abruptly"))
            else:
                self.retry.append(culprit)
        self.todo.extendleft(reversed(again))

    def _enforce_timeout(self) -> None:
        assert self._timeout is not None
        now = time.monotonic()
        for worker in list(self.workers):
            running = worker.running()
            if running is None or (worker.asked is not None and worker.asked[1:] != running[:2]):
                worker.asked = None  # the run it was asked about has finished after all
                worker.state[3] = 0
            if running is None or now - running[2] <= self._timeout:
                continue
            if worker.asked is None and REPORT_SIGNAL is not None:
                worker.asked = (now, running[0], running[1])
                worker.state[3] = 0
                try:
                    os.kill(worker.process.pid, REPORT_SIGNAL)
                except OSError:
                    pass
                continue
            if worker.asked is not None and not worker.state[3] and now - worker.asked[0] < _REPORT_SECONDS:
                continue  # give it a moment to say where it is
            self._time_out(worker, running)

    def _time_out(self, worker: _Worker, running: tuple[int, int, float]) -> None:
        answer = read_report(worker.state, worker.report)
        worker.process.kill()  # before reading state[4]: then it is final
        worker.process.join()
        try:  # what it finished before it was killed
            while worker.conn.poll():
                self._receive(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass
        batch = next((b for b in worker.batches if b.seq == running[0]), None)
        if batch is None or running[1] < batch.back:  # it came back after all
            self._lost(worker, blame=False)
            return
        spec = batch.specs[running[1]]
        step = answer.get("step") or step_of(worker.state, self._steps)  # no answer: stuck in native code
        result = timed_out(spec, self._timeout or 0.0, step, answer.get("line", ""), answer.get("stack", ""))
        self._lost(worker, blame=False, stopped=result)


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


def _preload_for_workers() -> None:
    """Import in the driver what every forked worker imports first, so it is inherited.

    Each worker limits its native thread pools through threadpoolctl first thing;
    importing it costs ~16 ms of CPU, which every worker of every run() paid again.
    """
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency; the workers cope without it
        pass
