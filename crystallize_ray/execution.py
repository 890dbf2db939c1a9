"""RayExecution: every run of an experiment as a Ray task, streamed back with ray.wait.

The experiment is serialized once per ``run()`` and put in the object store once;
each task carries the object reference plus a batch of ``(replicate, condition)``
pairs, and each worker deserializes an experiment once. At most ``max_in_flight``
tasks are outstanding, so an experiment of 100,000 runs never holds 100,000 futures.
Tasks lost with their worker process or node are retried by Ray (``max_retries``);
a batch that still fails is split and its runs retried alone, so only the run that
really cannot complete is recorded as failed.

On Ctrl-C no new task is submitted, the tasks that are done within a short grace
are collected, every other outstanding task is cancelled (``ray.cancel(force=True)``
kills the worker of a running one), and an embedded Ray this backend started is
shut down before ``KeyboardInterrupt`` propagates; a second Ctrl-C does not leave
tasks behind.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from crystallize.backend import (
    GRACE_SECONDS,
    WAIT_SLICE_SECONDS,
    ExecutionBackend,
    RunResult,
    RunSpec,
    check_option,
    failed_run,
    is_int,
    resolve_cache,
    serialize_experiment,
    unpack_results,
    worker_died,
)

from . import _worker, cache_tier

__all__ = ["RayExecution"]

INSTALL_HINT = "pip install 'crystallize-lab[ray]'"
_TARGET_BATCH_SECONDS = 0.05
_MAX_BATCH = 256

log = logging.getLogger("crystallize_ray")


def import_ray() -> Any:
    """Import Ray, or fail with the command that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"RayExecution needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


class RayExecution(ExecutionBackend):
    """Run each replicate × condition as a Ray task; use it like ParallelExecution.

    Connecting: if Ray is already initialised in this process it is used as is;
    otherwise ``address``, else ``$RAY_ADDRESS``, else an embedded local Ray is
    started. Whatever this backend started is shut down at the end of ``run()``.

    On Ctrl-C ``run()`` raises ``KeyboardInterrupt`` within about a second with the
    finished runs in ``exc.partial_result``: tasks not yet done are cancelled
    (running ones by killing their worker), and an embedded Ray is shut down.

    Args:
        address: a Ray cluster address (``"auto"``, ``"ray://host:10001"``...).
        num_cpus: CPUs each task reserves.
        num_gpus: GPUs each task reserves.
        resources: custom resources each task reserves, e.g. ``{"accelerator": 1}``.
        runtime_env: a Ray runtime environment for the tasks (pip packages,
            ``working_dir``, env vars).
        max_retries: how often Ray retries a task whose worker process or node died.
        max_in_flight: the most tasks outstanding at once; default four per CPU
            of the cluster (at least 16).
        batch_size: runs per task; ``None`` (default) adapts: tasks start with one
            run, and runs that prove tiny are grouped so a task takes ~50 ms.
        retry_errors: how often a run whose step raised is run again in its task
            (default 0: step errors are recorded, not retried).
        progress: show a progress line over runs in the driver.
        init_kwargs: extra arguments for ``ray.init`` when this backend starts Ray.
        object_store_cache: share cached step outputs between the cluster's nodes
            through Ray's object store (``True``, the default, keeps up to 2 GiB; an
            integer sets the bound in bytes; ``False`` turns it off). See
            ``crystallize_ray/cache_tier.py``.

    Raises:
        ImportError: Ray is not installed (the message gives the pip command).

    Example:
        >>> from crystallize import Experiment, pipeline_step
        >>> @pipeline_step()
        ... def square(data):
        ...     return data, {"square": data * data}
        >>> exp = Experiment(datasource=lambda ctx: ctx["replicate"], pipeline=[square()],
        ...                  plugins=[RayExecution(num_cpus=1)])  # doctest: +SKIP
        >>> exp.run(replicates=100).metrics.baseline.metrics["square"][:4]  # doctest: +SKIP
        [0, 1, 4, 9]
    """

    ships_experiment = True

    def __init__(
        self,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        max_retries: int = 3,
        max_in_flight: int | None = None,
        batch_size: int | None = None,
        retry_errors: int = 0,
        progress: bool = False,
        init_kwargs: Mapping[str, Any] | None = None,
        object_store_cache: bool | int = True,
    ) -> None:
        import_ray()
        owner = "RayExecution"
        check_option(
            owner,
            "address",
            address,
            lambda v: v is None or isinstance(v, str),
            "None or an address string such as 'auto' or 'ray://host:10001'",
        )
        for option, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            check_option(owner, option, value, _non_negative, "a number >= 0")
        check_option(
            owner,
            "resources",
            resources,
            lambda v: v is None or all(isinstance(k, str) and _non_negative(n) for k, n in v.items()),
            "None or a mapping of resource names to numbers >= 0",
        )
        check_option(
            owner, "max_retries", max_retries, lambda v: is_int(v, -1), "an integer >= 0 (or -1 for unlimited)"
        )
        check_option(
            owner, "max_in_flight", max_in_flight, lambda v: v is None or is_int(v, 1), "None or an integer >= 1"
        )
        check_option(owner, "batch_size", batch_size, lambda v: v is None or is_int(v, 1), "None or an integer >= 1")
        check_option(owner, "retry_errors", retry_errors, lambda v: is_int(v, 0), "an integer >= 0")
        check_option(owner, "progress", progress, lambda v: isinstance(v, bool), "True or False")
        check_option(
            owner,
            "object_store_cache",
            object_store_cache,
            lambda v: isinstance(v, bool) or is_int(v, 1),
            "True, False or a number of bytes >= 1",
        )
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = dict(resources or {})
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self.retry_errors = retry_errors
        self.progress = progress
        self.init_kwargs = dict(init_kwargs or {})
        self.object_store_cache = object_store_cache

    # -- connecting -------------------------------------------------------------
    def connect(self) -> bool:
        """Make sure Ray is initialised; return True when this call started it."""
        ray = import_ray()
        if ray.is_initialized():
            return False
        kwargs = dict(self.init_kwargs)
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            kwargs["address"] = address
        else:
            # Ray's own default on purpose: join a Ray started with `ray start` on this
            # machine (how a `ray submit` script finds its cluster on the head node),
            # else start an embedded one. Pass init_kwargs={"address": "local"} to
            # always start a fresh one.
            kwargs.setdefault("include_dashboard", False)  # a laptop run needs no web UI
        kwargs.setdefault("logging_level", logging.WARNING)
        ray.init(**kwargs)
        return True

    # -- executing --------------------------------------------------------------
    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        ray = import_ray()
        # Resolve ./.cache in the driver: Ray workers may run in another directory.
        job = resolve_cache(experiment)
        if self.object_store_cache:  # nodes share cached outputs through the object store
            job = cache_tier.share_outputs(job, self.object_store_cache)
        blob = serialize_experiment(job, backend="Ray")  # fails before any task
        started = self.connect()
        try:
            yield from self._stream(ray, job, plan, blob)
        finally:
            if started:
                ray.shutdown()

    def _stream(self, ray: Any, job: Any, plan: Sequence[RunSpec], blob: bytes) -> Iterator[RunResult]:
        holder = [ray.put(blob)]
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_retries": self.max_retries,
        }
        if self.resources:
            options["resources"] = self.resources
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        # Resources are fixed once here; each task only adds its readable name.
        task = ray.remote(**options)(_worker.make_task(holder, self.retry_errors))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        limit = self.max_in_flight or max(16, 4 * cpus)
        sizer = _BatchSizer(self.batch_size, cpus)
        pending: deque[RunSpec] = deque(plan)
        singles: deque[RunSpec] = deque()  # runs of failed batches, retried alone
        running: dict[Any, list[RunSpec]] = {}
        ready: deque[RunResult] = deque()  # back, not yet yielded

        def submit(batch: list[RunSpec]) -> None:
            ref = task.options(name=_label(job.name, batch)).remote(_worker.spec_pairs(batch))
            running[ref] = batch

        def harvest(ref: Any) -> None:
            ready.extend(self._results(ray, ref, running[ref], singles, sizer))
            del running[ref]

        try:
            while pending or singles or running:
                while singles and len(running) < limit:
                    submit([singles.popleft()])
                while pending and len(running) < limit:
                    size = sizer.next_size(len(pending))
                    submit([pending.popleft() for _ in range(min(size, len(pending)))])
                done: list[Any] = []
                while not done:
                    done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_SLICE_SECONDS)
                for ref in done:
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
                _cancel(ray, running)
            while ready:
                yield ready.popleft()
            raise
        finally:
            _cancel(ray, running)  # on any other way out, too

    def _results(
        self, ray: Any, ref: Any, batch: list[RunSpec], singles: deque[RunSpec], sizer: _BatchSizer
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
            return [worker_died(batch[0], self.max_retries + 1, _describe(exc))]
        sizer.observe(results)
        return results


def _cancel(ray: Any, running: dict[Any, list[RunSpec]]) -> None:
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


def _non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


class _BatchSizer:
    """Chooses runs per task: fixed, or grown until a task takes ~50 ms."""

    def __init__(self, fixed: int | None, cpus: int) -> None:
        self.fixed, self.cpus = fixed, cpus
        self.mean: float | None = None

    def observe(self, results: list[RunResult]) -> None:
        if results:
            seconds = sum(r.seconds for r in results) / len(results)
            self.mean = seconds if self.mean is None else 0.8 * self.mean + 0.2 * seconds

    def next_size(self, remaining: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.mean is None:
            return 1
        size = int(_TARGET_BATCH_SECONDS / max(self.mean, 1e-6))
        # Keep every CPU busy to the end: never more than a quarter of the
        # remaining work per CPU in one task.
        fair = math.ceil(remaining / (4 * self.cpus))
        return max(1, min(size, fair, _MAX_BATCH))


def _label(name: str, batch: list[RunSpec]) -> str:
    if len(batch) == 1:
        return batch[0].label(name)
    first, last = batch[0], batch[-1]
    return f"crystallize:{name} r={first.replicate}..{last.replicate} ({len(batch)} runs)"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
