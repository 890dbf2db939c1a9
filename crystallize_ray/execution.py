"""RayExecution: every run of an experiment as a Ray task; heavy steps as actor pools.

Per ``run()``, in the driver: the cache is resolved, each heavy step's pool is
specified (:mod:`crystallize_ray.pools`), the experiment is serialized once with those
steps as stand-ins and put in the object store once. Ray is connected (an embedded
Ray, once started, stays up for later runs: :mod:`crystallize_ray.session`), the pools
are placed and set up — or reused — before any run is submitted, and the runs stream
through a bounded window of tasks (:mod:`crystallize_ray._stream`). Each worker loads
an experiment once and sends its heavy steps' calls to their pools.

On Ctrl-C no new task is submitted, the tasks that are done within a short grace
are collected, every other outstanding task is cancelled (``ray.cancel(force=True)``
kills the worker of a running one), and an embedded Ray crystallize started is shut
down, pools included, before ``KeyboardInterrupt`` propagates; a second Ctrl-C does
not leave tasks behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from crystallize.backend import (
    ExecutionBackend,
    RunResult,
    RunSpec,
    check_option,
    failed_run,
    host_steps,
    is_int,
    is_seconds,
    resolve_cache,
    serialize_experiment,
)

from . import _stream, _worker, cache_tier, session
from .pool_specs import POOL_OPTIONS, check_pool_option, heavy_specs, with_runtime_env
from .pools import pools

__all__ = ["RayExecution"]

INSTALL_HINT = "pip install 'crystallize-lab[ray]'"

log = logging.getLogger("crystallize_ray")


def import_ray() -> Any:
    """Import Ray, or fail with the command that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"RayExecution needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


class RayExecution(ExecutionBackend):
    """Run each replicate × condition as a Ray task; heavy steps as actor pools.

    Connecting: if Ray is already initialised in this process it is used as is;
    otherwise ``address``, else ``$RAY_ADDRESS``, else ``ray.init()`` joins a local
    ``ray start`` or starts an embedded Ray. What crystallize started stays up for
    the next ``run()`` — no second start-up — until :meth:`shutdown` (or the end of a
    ``with RayExecution() as backend:`` block) or the interpreter exits.

    Every ``heavy = True`` class step becomes a pool of actors, each building the
    step from its recipe and calling ``setup()`` once (never in the driver); runs
    send their calls to it. Pools are placed before runs are submitted and reused by
    later ``run()`` calls while the step's recipe and resources are unchanged (see
    :mod:`crystallize_ray.pools` for sizing and ``heavy=``).

    On Ctrl-C ``run()`` raises ``KeyboardInterrupt`` within about a second with the
    finished runs in ``exc.partial_result``: tasks not yet done are cancelled
    (running ones by killing their worker), and an embedded Ray crystallize started
    is shut down, pools included (their ``teardown()`` does not run).

    Args:
        address: a Ray cluster address (``"auto"``, ``"ray://host:10001"``...).
        num_cpus: CPUs each task reserves.
        num_gpus: GPUs each task reserves.
        resources: custom resources each task reserves, e.g. ``{"accelerator": 1}``.
        runtime_env: a Ray runtime environment (pip packages, ``working_dir``, env
            vars), applied to the whole job when crystallize starts or joins Ray;
            when Ray is already initialised, ``working_dir``/``py_modules`` must be
            given to your ``ray.init`` instead (a ``ConfigurationError`` says so) and
            the other keys apply to each task and actor.
        max_retries: how often Ray retries a task whose worker process or node died;
            also how often a heavy step's call is sent again when its actor died.
        max_in_flight: the most tasks outstanding at once; default four per task
            slot of the cluster (at least 16).
        batch_size: runs per task; ``None`` (default) adapts: tasks start with one
            run, and runs that prove tiny are grouped so a task takes ~50 ms; runs of
            pipelines with async or heavy steps are spread over the task slots.
        retry_errors: how often a run whose step raised is run again in its task
            (default 0: step errors are recorded, not retried).
        progress: show a progress line over runs in the driver.
        init_kwargs: extra arguments for ``ray.init`` when this backend starts Ray.
        heavy: per heavy step, by class name, options that win over its class
            attributes: ``pool_size``, ``num_cpus``, ``num_gpus``, ``resources``,
            ``max_concurrency`` (calls one actor runs at once, default 1),
            ``max_restarts`` (default 5), e.g.
            ``heavy={"ModelStep": {"pool_size": 2, "num_gpus": 1}}``.
        placement_timeout: seconds to wait for a pool's resources before every run
            that needs it is recorded as failed with a ``PoolPlacementError`` naming
            the missing resource (default 60).
        max_concurrency: the most runs of one task that share its worker's event
            loop, for pipelines with async or heavy steps (default 64).
        timeout: seconds one run may take (``None``: no limit). A run that exceeds
            it is recorded as a ``TimeoutError`` naming the step it was in; its
            worker is killed and replaced, and the other runs go on. Each task then
            carries one run.
        max_runs_per_worker: replace a worker process after this many runs (Ray's
            ``max_calls``; its steps are torn down first), for steps that leak
            memory. Each task then carries one run.
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
    supports_timeout = True

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
        heavy: Mapping[str, Mapping[str, Any]] | None = None,
        placement_timeout: float = 60.0,
        max_concurrency: int = 64,
        timeout: float | None = None,
        max_runs_per_worker: int | None = None,
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
        check_option(
            owner,
            "heavy",
            heavy,
            _pool_overrides_valid,
            f"None or a mapping of step class names to options ({', '.join(POOL_OPTIONS)})",
        )
        check_option(owner, "placement_timeout", placement_timeout, is_seconds, "a number of seconds > 0")
        check_option(owner, "max_concurrency", max_concurrency, lambda v: is_int(v, 1), "an integer >= 1")
        check_option(owner, "timeout", timeout, lambda v: v is None or is_seconds(v), "None or a number of seconds > 0")
        check_option(
            owner,
            "max_runs_per_worker",
            max_runs_per_worker,
            lambda v: v is None or is_int(v, 1),
            "None or an integer >= 1",
        )
        self.heavy = {name: dict(options) for name, options in (heavy or {}).items()}
        self.placement_timeout = placement_timeout
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_runs_per_worker = max_runs_per_worker

    # -- connecting -------------------------------------------------------------
    def connect(self) -> bool:
        """Make sure Ray is initialised; return True when this call initialised it.

        Raises:
            ConfigurationError: ``runtime_env`` has ``working_dir``/``py_modules``
                but Ray was already initialised without them (the message says where
                to put them).
        """
        import_ray()
        return session.connect(self.address, self.init_kwargs, self.runtime_env)

    def shutdown(self) -> None:
        """Retire every actor pool (each actor's ``teardown()`` runs) and shut down a Ray
        crystallize started; a Ray you initialised stays up. Safe to call twice.

        Example:
            >>> with RayExecution() as backend:            # doctest: +SKIP
            ...     Experiment(..., plugins=[backend]).run()
        """
        import_ray()
        session.shutdown()

    def __enter__(self) -> RayExecution:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- executing --------------------------------------------------------------
    def execute(self, experiment: Any, plan: Sequence[RunSpec]) -> Iterator[RunResult]:
        ray = import_ray()
        # Resolve ./.cache in the driver: Ray workers may run in another directory.
        job = resolve_cache(experiment)
        if self.object_store_cache:  # nodes share cached outputs through the object store
            job = cache_tier.share_outputs(job, self.object_store_cache)
        self._warn_unused_overrides(job)
        specs = heavy_specs(job, self.heavy)  # a heavy step that cannot be pickled fails here
        shipped = host_steps(job, [index for spec in specs.values() for index in spec.indexes])
        blob = serialize_experiment(shipped, backend="Ray")  # fails before any task
        self.connect()
        specs = with_runtime_env(specs, session.task_runtime_env(self.runtime_env))
        try:
            handles, failure = (
                pools().acquire(
                    specs,
                    runs=len(plan),
                    task_bundle=self._task_bundle(),
                    placement_timeout=self.placement_timeout,
                    retries=max(self.max_retries, 1),
                )
                if specs
                else ({}, None)
            )
            if failure is not None:  # every run needs the pool: each records why it is not there
                log.error("%s Every run that needs it is recorded as failed.", failure.message)
                for spec in plan:
                    yield failed_run(spec, failure.where, failure.type, failure.message, traceback=failure.traceback)
                return
            yield from self._stream(ray, shipped, plan, blob, handles)
        except KeyboardInterrupt:
            session.stop_on_interrupt()
            raise

    def _stream(
        self, ray: Any, job: Any, plan: Sequence[RunSpec], blob: bytes, handles: Mapping[int, Any]
    ) -> Iterator[RunResult]:
        one_per_task = self.timeout is not None or self.max_runs_per_worker is not None
        overlap = bool(handles) or job.pipeline.is_async
        board = None
        if self.timeout is not None:
            from ._deadlines import TimeoutBoard

            board = ray.remote(TimeoutBoard).options(num_cpus=0, max_concurrency=1000).remote(self.timeout)
        work = _worker.Job(
            holder=[ray.put(blob)],
            pools=dict(handles),
            retry_errors=self.retry_errors,
            overlap=overlap,
            max_concurrency=self.max_concurrency,
            timeout=self.timeout,
            board=board,
            max_calls=self.max_runs_per_worker,
        )
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_retries": self.max_retries,
        }
        if self.resources:
            options["resources"] = self.resources
        runtime_env = session.task_runtime_env(self.runtime_env)
        if runtime_env:
            options["runtime_env"] = runtime_env
        if self.max_runs_per_worker is not None:
            options["max_calls"] = self.max_runs_per_worker
        # Resources are fixed once here; each task only adds its readable name.
        task = ray.remote(**options)(_worker.make_task(work))
        pools_used = list({id(h): h for h in handles.values()}.values())  # a step twice: one pool
        slots = self._task_slots(ray, pools_used)
        sizer = _stream.BatchSizer(
            1 if one_per_task else self.batch_size,
            slots,
            overlap=overlap,
            total=len(plan),
            max_concurrency=self.max_concurrency,
            overlap_cap=_pool_capacity(pools_used),
        )
        try:
            yield from _stream.stream(
                ray,
                task,
                job.name,
                list(plan),
                limit=self.max_in_flight or max(16, 4 * slots),
                sizer=sizer,
                max_retries=self.max_retries,
                timeout=self.timeout,
                board=board,
            )
        finally:
            if board is not None:
                ray.kill(board)

    def _task_bundle(self) -> dict[str, float]:
        """What one task holds, kept free when pools are sized."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {name: float(amount) for name, amount in wanted.items() if amount > 0}

    def _task_slots(self, ray: Any, pools_used: Sequence[Any]) -> int:
        """How many tasks can run at once: the cluster's CPUs less the pools', per task."""
        cpus = float(ray.cluster_resources().get("CPU", 1))
        cpus -= sum(len(h.actors) * h.cpus for h in pools_used)
        return max(1, int(cpus // self.num_cpus) if self.num_cpus > 0 else int(cpus))

    def _warn_unused_overrides(self, job: Any) -> None:
        steps = {type(s).__name__: s for s in job.pipeline.steps}
        steps.update({f"{type(s).__module__}.{type(s).__qualname__}": s for s in job.pipeline.steps})
        for name in self.heavy:
            step = steps.get(name)
            if step is None:
                log.warning(
                    "RayExecution(heavy=...) names %r, which is no step of experiment %r; its options are not used.",
                    name,
                    job.name,
                )
            elif not getattr(step, "heavy", False):
                log.warning(
                    "RayExecution(heavy=...) names %r, which is not a heavy step: it runs in "
                    "each task, not in a pool. Set heavy = True on the class to pool it.",
                    name,
                )


def _pool_capacity(pools_used: Sequence[Any]) -> int | None:
    """How many calls the narrowest pool takes at once (its actors, each with its bound)."""
    return min((len(h.actors) * h.max_in_flight for h in pools_used), default=None)


def _pool_overrides_valid(value: Any) -> bool:
    if value is None:
        return True
    return all(
        isinstance(name, str)
        and isinstance(options, Mapping)
        and all(check_pool_option(option, v) is None for option, v in options.items())
        for name, options in value.items()
    )


def _non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
