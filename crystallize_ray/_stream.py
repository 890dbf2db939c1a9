"""The driver's loop for one run(): tasks submitted in a bounded window, results streamed back.

At most ``limit`` tasks are outstanding, so 100,000 runs never hold 100,000 futures.
Each task carries a batch of runs (see :class:`BatchSizer`). A task whose worker
process or node died is retried by Ray (``max_retries``); a batch that still fails is
split and its runs are retried alone, each with Ray's full retry budget again, so
only the run that really cannot complete is recorded as failed.

With a per-run ``timeout`` each task carries one run, and one long-poll call to the
timeout board (:mod:`crystallize_ray._deadlines`) is kept outstanding next to the
tasks: a run reported overdue has its task cancelled (its worker killed and replaced)
and is recorded as a ``TimeoutError`` naming its step.

On Ctrl-C no new task is submitted, the tasks done within a short grace are
collected, and every other outstanding task is cancelled (``ray.cancel(force=True)``
kills the worker of a running one); a second Ctrl-C does not leave tasks behind.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from crystallize.backend import (
    GRACE_SECONDS,
    WAIT_SLICE_SECONDS,
    RunResult,
    RunSpec,
    failed_run,
    timed_out,
    unpack_results,
    worker_died,
)

from . import _worker

__all__ = ["BatchSizer", "stream"]

log = logging.getLogger("crystallize_ray")

_TARGET_BATCH_SECONDS = 0.05
_MAX_BATCH = 256


class BatchSizer:
    """Chooses runs per task.

    * fixed: ``batch_size=`` (or one run per task, for timeouts and
      ``max_runs_per_worker``);
    * overlapping (async or pooled steps, whose runs mostly wait): the plan spread
      evenly over the task slots, at most ``max_concurrency`` runs per task, so runs
      share each worker's event loop. Runs that wait on an actor pool gain nothing
      from sharing a task beyond the calls the pool serves at once (``overlap_cap``,
      spread over the slots): a bigger batch would only hold finished runs back from
      the driver, its journal and a Ctrl-C, since a task returns its runs together;
    * otherwise adaptive: tasks start with one run, and runs that prove tiny are
      grouped until a task takes ~50 ms, never more than a quarter of the remaining
      work per slot, so every CPU stays busy to the end.
    """

    def __init__(
        self,
        fixed: int | None,
        slots: int,
        *,
        overlap: bool = False,
        total: int = 0,
        max_concurrency: int = 64,
        overlap_cap: int | None = None,
    ) -> None:
        self.fixed, self.slots = fixed, max(1, slots)
        self.mean: float | None = None
        self.overlap_size = None
        if overlap and fixed is None:
            size = min(max_concurrency, math.ceil(total / self.slots))
            if overlap_cap is not None:
                size = min(size, math.ceil(overlap_cap / self.slots))
            self.overlap_size = max(1, size)

    def observe(self, results: list[RunResult]) -> None:
        if results:
            seconds = sum(r.seconds for r in results) / len(results)
            self.mean = seconds if self.mean is None else 0.8 * self.mean + 0.2 * seconds

    def next_size(self, remaining: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.overlap_size is not None:
            return self.overlap_size
        if self.mean is None:
            return 1
        size = int(_TARGET_BATCH_SECONDS / max(self.mean, 1e-6))
        fair = math.ceil(remaining / (4 * self.slots))
        return max(1, min(size, fair, _MAX_BATCH))


def stream(
    ray: Any,
    task: Any,
    name: str,
    plan: list[RunSpec],
    *,
    limit: int,
    sizer: BatchSizer,
    max_retries: int,
    timeout: float | None = None,
    board: Any = None,
) -> Iterator[RunResult]:
    """Submit ``plan`` as tasks of ``task`` and yield every run's result once.

    Args:
        ray: the ray module.
        task: the remote task function (its options fixed).
        name: the experiment's name, for task names.
        plan: the runs.
        limit: the most tasks outstanding at once.
        sizer: runs per task.
        max_retries: Ray's retries per task, for the failure records.
        timeout: seconds per run (needs ``board``), or ``None``.
        board: the :class:`~crystallize_ray._deadlines.TimeoutBoard` actor.
    """
    pending: deque[RunSpec] = deque(plan)
    singles: deque[RunSpec] = deque()  # runs of failed batches, retried alone
    running: dict[Any, list[RunSpec]] = {}
    ids: dict[int, Any] = {}  # batch id -> its task's reference (timeouts only)
    batch_of: dict[Any, int] = {}
    ready: deque[RunResult] = deque()  # back, not yet yielded
    finished: list[int] = []
    counter = [0]
    poll = board.next.remote() if board is not None else None

    def submit(batch: list[RunSpec]) -> None:
        named = task.options(name=_label(name, batch))
        if board is None:
            running[named.remote(_worker.spec_pairs(batch))] = batch
            return
        counter[0] += 1  # with timeouts, the board reports overdue runs by this id
        ref = named.remote(_worker.spec_pairs(batch), counter[0])
        running[ref] = batch
        ids[counter[0]], batch_of[ref] = ref, counter[0]

    def forget(ref: Any) -> list[RunSpec]:
        batch = running.pop(ref)
        batch_id = batch_of.pop(ref, None)
        if batch_id is not None:
            ids.pop(batch_id, None)
            finished.append(batch_id)
        return batch

    def harvest(ref: Any) -> None:
        batch = forget(ref)
        ready.extend(_results(ray, ref, batch, singles, sizer, max_retries))

    def expire(events: list[tuple[Any, ...]]) -> None:
        for batch_id, run, step, line, stack in events:
            ref = ids.get(batch_id)
            if ref is None or ref not in running:
                continue  # it finished meanwhile: its own result stands
            batch = forget(ref)
            try:
                ray.cancel(ref, force=True)  # kills its worker; Ray starts another
            except Exception as exc:
                log.debug("Could not cancel a timed-out task: %s", exc)
            late = RunSpec(run[0], run[1])
            for spec in batch:
                if spec == late:
                    ready.append(timed_out(spec, timeout or 0.0, step, line, stack))
                else:  # never started, or lost with the worker: run again
                    singles.append(spec)

    try:
        while pending or singles or running:
            while singles and len(running) < limit:
                submit([singles.popleft()])
            while pending and len(running) < limit:
                size = sizer.next_size(len(pending))
                submit([pending.popleft() for _ in range(min(size, len(pending)))])
            if board is not None and finished:
                board.finished.remote(finished[:])
                finished.clear()
            watched = list(running) + ([poll] if poll is not None else [])
            done: list[Any] = []
            while not done:
                done, _ = ray.wait(watched, num_returns=1, timeout=WAIT_SLICE_SECONDS)
            for ref in done:
                if poll is not None and ref == poll:
                    expire(ray.get(poll))
                    poll = board.next.remote()
                elif ref in running:
                    harvest(ref)
            while ready:
                yield ready.popleft()
    except KeyboardInterrupt:
        try:  # keep the tasks that come back within the grace, and only their runs
            deadline = time.monotonic() + GRACE_SECONDS
            while running and (left := deadline - time.monotonic()) > 0:
                done, _ = ray.wait(list(running), num_returns=1, timeout=min(left, WAIT_SLICE_SECONDS))
                for ref in done:
                    del running[ref]
                    try:
                        ready.extend(unpack_results(ray.get(ref)))
                    except ray.exceptions.RayError:
                        pass  # it did not finish: a worker lost, or cancelled by Ctrl-C too
        finally:
            cancel(ray, running)
        while ready:
            yield ready.popleft()
        raise
    finally:
        cancel(ray, running)  # on any other way out, too


def _results(
    ray: Any, ref: Any, batch: list[RunSpec], singles: deque[RunSpec], sizer: BatchSizer, max_retries: int
) -> list[RunResult]:
    """What a finished task brought back: its runs, failure records, or nothing (retried)."""
    try:
        results = unpack_results(ray.get(ref))
    except ray.exceptions.RayTaskError as exc:
        # The task body itself raised: e.g. the experiment could not be loaded on
        # that node. Retrying would fail the same way.
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        return [failed_run(spec, "worker", type(cause).__name__, str(cause), traceback=str(exc)) for spec in batch]
    except ray.exceptions.RayError as exc:
        if len(batch) > 1:
            singles.extend(batch)
            return []
        return [worker_died(batch[0], max_retries + 1, _describe(exc))]
    sizer.observe(results)
    return results


def cancel(ray: Any, running: dict[Any, list[RunSpec]]) -> None:
    """Cancel every outstanding task, killing the worker of a running one; idempotent.

    A second Ctrl-C does not cut this short: it would leave tasks running on the
    cluster after the driver gave up on them.
    """
    interrupted: KeyboardInterrupt | None = None
    while running:
        try:
            while running:
                ref = next(iter(running))
                try:
                    ray.cancel(ref, force=True)
                except Exception as exc:  # e.g. already finished and freed
                    log.debug("Could not cancel task %s: %s", ref, exc)
                del running[ref]
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def _label(name: str, batch: list[RunSpec]) -> str:
    if len(batch) == 1:
        return batch[0].label(name)
    first, last = batch[0], batch[-1]
    return f"crystallize:{name} r={first.replicate}..{last.replicate} ({len(batch)} runs)"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
