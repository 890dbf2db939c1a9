"""Heavy steps as Ray actor pools: placed before the runs, reused across run() calls, retired with teardown().

Under :class:`~crystallize_ray.RayExecution` every class step with ``heavy = True``
becomes a pool of actors (:class:`~crystallize_ray._host.StepHost`). Each actor builds
the step from its recipe (class + constructor arguments, and the experiment's
``initial_ctx`` for ``setup(ctx)``) and calls ``setup()`` once; the runs stay Ray tasks
and send their calls to the pool (see :mod:`crystallize_ray._router`).

Sizing and resources come from the step's class attributes, overridable per backend
with ``RayExecution(heavy={"ModelStep": {...}})`` (the options are listed in
:mod:`crystallize_ray.pool_specs`).

Each actor gets a placement group of one bundle, created and waited for *before* any
run is submitted, so runs waiting on a pool never hold the CPUs it needs; a pool that
cannot be placed within ``placement_timeout`` seconds is reported, naming the missing
resource, on every run that needed it, and so is a step whose constructor or
``setup()`` fails (after :data:`~crystallize_ray._host.SETUP_ATTEMPTS` attempts).

Pools live in the driver process, not in one ``run()``: a later ``run()`` whose step has
the same recipe and resources reuses the pool (actors found dead are replaced). A pool
is retired — ``teardown()`` on every actor, then the actors and their placements freed —
when a ``run()`` uses the same step class with another recipe, when its resources are
needed by a new pool, at :meth:`RayExecution.shutdown`, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crystallize.backend import WAIT_SLICE_SECONDS

from ._host import CONTROL_METHODS, SETUP_ATTEMPTS, StepHost
from ._router import PoolHandle
from .pool_specs import PoolFailure, PoolSpec, first_line, starved, unplaceable

__all__ = ["Pools", "pools"]

log = logging.getLogger("crystallize_ray")

#: Calls an actor holds beyond those running, counted in the load it reports.
WAITING_CALLS = 4
#: How long retiring a pool waits for its actors' teardown() before killing them.
RETIRE_SECONDS = 10.0
#: How long a reused pool's actors may take to answer a ping before they count as dead.
PING_SECONDS = 5.0


@dataclass
class _Member:
    actor: Any
    group: Any  # its placement group, or None when it holds no resources


@dataclass
class _Pool:
    spec: PoolSpec
    members: list[_Member] = field(default_factory=list)
    generation: int = 0
    last_used: float = 0.0

    def handle(self, retries: int) -> PoolHandle:
        return PoolHandle(
            step=self.spec.name,
            key=self.spec.key,
            generation=f"{self.spec.key}/{self.generation}",
            actors=tuple(m.actor for m in self.members),
            max_in_flight=2 * self.spec.max_concurrency,
            retries=retries,
            cpus=self.spec.num_cpus,
        )


class Pools:
    """The pools of this driver process (one registry per process: see :func:`pools`)."""

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self._lock = threading.RLock()
        self._cluster: str | None = None
        self._exit_hook = False
        self._host_class: Any = None

    # -- acquiring ------------------------------------------------------------------
    def acquire(
        self,
        specs: Mapping[str, PoolSpec],
        *,
        runs: int,
        task_bundle: Mapping[str, float],
        placement_timeout: float,
        retries: int,
    ) -> tuple[dict[int, PoolHandle], PoolFailure | None]:
        """The handles for this run()'s pools, placing and setting up what is missing.

        Args:
            specs: from :func:`heavy_specs`.
            runs: how many runs the pools serve (a default pool is never larger).
            task_bundle: what one task of this run() holds; kept free for the runs.
            placement_timeout: seconds to wait for a new actor's resources.
            retries: ``PoolHandle.retries`` for the routers.

        Returns:
            ``(step index -> handle, None)``, or ``({}, failure)`` for the first pool
            that could not be placed or set up.
        """
        import ray

        with self._lock:
            self._check_cluster(ray)
            if not self._exit_hook:
                self._register_exit_hook()
            needed = set(specs)
            outdated = [
                p
                for k, p in self._pools.items()
                if k not in needed and any(p.spec.qualified == s.qualified for s in specs.values())
            ]
            self._retire(outdated, "its recipe or resources changed")
            for key in needed & set(self._pools):
                self._drop_dead(self._pools[key])
            sizes = self._sizes(ray, specs, runs, task_bundle)
            no_room = starved(ray, specs, sizes, task_bundle)
            if no_room is not None:
                return {}, no_room
            for key, spec in specs.items():
                pool = self._pools.setdefault(key, _Pool(spec))
                failure = self._fill(ray, pool, sizes[key], spec.pool_size is not None, placement_timeout, needed)
                if failure is not None:
                    if not pool.members:
                        del self._pools[key]
                    return {}, failure
            handles: dict[int, PoolHandle] = {}
            now = time.monotonic()
            for key, spec in specs.items():
                pool = self._pools[key]
                pool.last_used = now
                handle = pool.handle(retries)
                for index in spec.indexes:
                    handles[index] = handle
            return handles, None

    def _sizes(
        self, ray: Any, specs: Mapping[str, PoolSpec], runs: int, task_bundle: Mapping[str, float]
    ) -> dict[str, int]:
        """Each pool's actors: explicit, or as many as the cluster's resources allow."""
        free = {name: float(amount) for name, amount in ray.cluster_resources().items()}
        for name, amount in task_bundle.items():  # one task's worth stays for the runs
            free[name] = free.get(name, 0.0) - amount
        sizes: dict[str, int] = {}
        for key, spec in specs.items():
            if spec.pool_size is not None:
                sizes[key] = spec.pool_size
                for name, amount in spec.bundle().items():
                    free[name] = free.get(name, 0.0) - amount * spec.pool_size
        automatic = [spec for spec in specs.values() if spec.pool_size is None]
        for spec in automatic:
            bundle = spec.bundle()
            if not bundle:  # holds nothing: one actor per CPU of the cluster
                bundle = {"CPU": 1.0}
            fits = min(
                math.floor(max(free.get(name, 0.0), 0.0) / len(automatic) / amount + 1e-9)
                for name, amount in bundle.items()
            )
            sizes[spec.key] = max(1, min(runs, fits))
        return sizes

    def _fill(
        self, ray: Any, pool: _Pool, size: int, exact: bool, placement_timeout: float, needed: set[str]
    ) -> PoolFailure | None:
        """Bring ``pool`` to ``size`` live, set-up actors (a default pool never shrinks)."""
        spec = pool.spec
        if exact and len(pool.members) > size:
            extra, pool.members = pool.members[size:], pool.members[:size]
            self._retire_members(ray, extra)
            pool.generation += 1
        missing = size - len(pool.members)
        if missing <= 0:
            return None
        self._make_room(ray, spec.bundle(), missing, needed)
        placed: list[_Member] = []
        failure = None
        for _ in range(missing):
            group, failure = self._place(ray, spec, size, placement_timeout)
            if failure is not None:
                break
            placed.append(_Member(self._start(ray, spec, group), group))
        if failure is not None and (exact or not (placed or pool.members)):
            self._retire_members(ray, placed, teardown=False)
            return failure
        failure = self._await_setup(ray, spec, placed)
        good = [m for m in placed if m is not None]
        if failure is not None and not (good or pool.members):
            return failure
        if failure is not None:
            log.warning(
                "Step %r: %s Going on with %d actor(s).", spec.name, failure.message, len(good) + len(pool.members)
            )
        pool.members += good
        pool.generation += 1
        return None

    def _place(self, ray: Any, spec: PoolSpec, size: int, timeout: float) -> tuple[Any, PoolFailure | None]:
        """One actor's placement group, ready; or why it could not be placed in time."""
        bundle = spec.bundle()
        if not bundle:
            return None, None
        from ray.util.placement_group import placement_group, remove_placement_group

        group = placement_group([bundle], strategy="PACK")
        deadline = time.monotonic() + timeout
        ready = group.ready()
        while True:
            done, _ = ray.wait([ready], timeout=min(WAIT_SLICE_SECONDS, max(deadline - time.monotonic(), 0)))
            if done:
                return group, None
            if time.monotonic() >= deadline:
                remove_placement_group(group)
                return None, PoolFailure(
                    f"{spec.name}.setup", "PoolPlacementError", unplaceable(ray, spec, size, timeout)
                )

    def _start(self, ray: Any, spec: PoolSpec, group: Any) -> Any:
        options: dict[str, Any] = {
            "num_cpus": spec.num_cpus,
            "num_gpus": spec.num_gpus,
            "max_restarts": spec.max_restarts,
            "max_task_retries": 0,
            # A threaded actor: the step's own bound applies inside; a few more calls
            # wait inside, where the actor counts them for the routers (ping() and the
            # other control calls have threads of their own: see _remote_host).
            "max_concurrency": spec.max_concurrency + WAITING_CALLS,
        }
        if spec.resources:
            options["resources"] = spec.resources
        if spec.runtime_env:
            options["runtime_env"] = spec.runtime_env
        if group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=False
            )
        if self._host_class is None:
            self._host_class = _remote_host(ray)
        return self._host_class.options(**options).remote(spec.recipe, spec.max_concurrency, SETUP_ATTEMPTS)

    def _await_setup(self, ray: Any, spec: PoolSpec, placed: list[Any]) -> PoolFailure | None:
        """Wait for the new actors' setup(); failed ones are killed and set to ``None``."""
        pending = {member.actor.ready.remote(): i for i, member in enumerate(placed)}
        failure = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SLICE_SECONDS)
            for ref in done:
                i = pending.pop(ref)
                try:
                    answer = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    answer = {"ok": False, "failure": (type(exc).__name__, first_line(exc), str(exc), 1)}
                if answer["ok"]:
                    continue
                kind, message, text, attempts = answer["failure"]
                failure = PoolFailure(
                    f"{spec.name}.setup",
                    kind,
                    f"Step {spec.name!r} could not be built and set up in its Ray actor pool: "
                    f"{kind}: {message} ({attempts} attempt(s)). Run it under SerialExecution to "
                    f"debug its setup().",
                    text,
                )
                self._retire_members(ray, [placed[i]], teardown=False)
                placed[i] = None
        return failure

    def _drop_dead(self, pool: _Pool) -> None:
        """Forget (and free) the actors of a reused pool that do not answer a ping."""
        import ray

        pings = {m.actor.ping.remote(): m for m in pool.members}
        # An actor that does not answer in time may be restarting (its setup() can take
        # minutes): it stays. Only Ray's word that it is dead removes it.
        done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_SECONDS)
        dead = []
        for ref in done:
            try:
                if not ray.get(ref)["ok"]:
                    dead.append(pings[ref])
            except ray.exceptions.RayError:
                dead.append(pings[ref])
        if dead:
            log.warning("Step %r: %d actor(s) of its pool are gone; replacing them.", pool.spec.name, len(dead))
            self._retire_members(ray, dead, teardown=False)
            pool.members = [m for m in pool.members if m not in dead]
            pool.generation += 1

    def _make_room(self, ray: Any, bundle: Mapping[str, float], count: int, needed: set[str]) -> None:
        """Retire idle pools (least recently used first) while the new actors would not fit."""

        def fits() -> bool:
            free = ray.available_resources()
            return all(free.get(name, 0.0) + 1e-9 >= amount * count for name, amount in bundle.items())

        idle = sorted((p for k, p in self._pools.items() if k not in needed), key=lambda p: p.last_used)
        while idle and not fits():
            self._retire([idle.pop(0)], "its resources are needed by a new pool")
            time.sleep(0.1)  # freed resources show up in available_resources() shortly

    # -- retiring -----------------------------------------------------------------------
    def retire_all(self, reason: str = "the backend was shut down") -> None:
        """Retire every pool: ``teardown()`` on each actor, then free them."""
        with self._lock:
            self._retire(list(self._pools.values()), reason)

    def _retire(self, retired: Sequence[_Pool], reason: str) -> None:
        import ray

        if not retired:
            return
        for pool in retired:
            log.info("Retiring the pool of step %r (%d actor(s)): %s.", pool.spec.name, len(pool.members), reason)
            self._pools.pop(pool.spec.key, None)
        if ray.is_initialized():
            self._retire_members(ray, [m for pool in retired for m in pool.members])

    def _retire_members(self, ray: Any, members: Sequence[_Member], *, teardown: bool = True) -> None:
        """Tear down (bounded), then kill, the actors and free their placements."""
        from ray.util.placement_group import remove_placement_group

        if teardown and members:
            refs = []
            for member in members:
                try:
                    refs.append(member.actor.retire.remote())
                except Exception as exc:  # already gone: nothing to tear down
                    log.debug("retire() could not be sent: %s", exc)
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=RETIRE_SECONDS)
        for member in members:
            try:
                ray.kill(member.actor, no_restart=True)
            except Exception as exc:
                log.debug("Could not kill a pool actor: %s", exc)
            if member.group is not None:
                try:
                    remove_placement_group(member.group)
                except Exception as exc:
                    log.debug("Could not remove a placement group: %s", exc)

    # -- bookkeeping ---------------------------------------------------------------------
    def _check_cluster(self, ray: Any) -> None:
        """Forget every pool when this process is connected to another Ray than before."""
        cluster = ray.get_runtime_context().get_session_name()
        if self._cluster is not None and cluster != self._cluster:
            self._pools.clear()
            self._host_class = None
        self._cluster = cluster

    def _register_exit_hook(self) -> None:
        # Registered after `import ray`, so it runs before Ray's own exit hook shuts down.
        atexit.register(self._at_exit)
        self._exit_hook = True

    def _at_exit(self) -> None:
        try:
            import ray

            if ray.is_initialized() and self._pools:
                self.retire_all("the interpreter is exiting")
        except Exception as exc:  # never fail an exit
            log.debug("Retiring pools at exit failed: %s", exc)

    def forget(self) -> None:
        """Drop every pool without contacting Ray (after Ray was shut down)."""
        with self._lock:
            self._pools.clear()
            self._cluster = None
            self._host_class = None


_POOLS = Pools()


def pools() -> Pools:
    """This process's pools."""
    return _POOLS


def _remote_host(ray: Any) -> Any:
    """StepHost as a Ray actor class whose control methods never wait behind calls."""
    for name in CONTROL_METHODS:
        ray.method(concurrency_group="control")(getattr(StepHost, name))
    return ray.remote(concurrency_groups={"control": len(CONTROL_METHODS)})(StepHost)
