"""Heavy steps as Ray actor pools: placed before the runs, reused across run() calls, retired with teardown().

Under :class:`~crystallize_ray.RayExecution` every class step with ``heavy = True``
becomes a pool of actors (:class:`~crystallize_ray._host.StepHost`). Each actor builds
the step from its recipe (class + constructor arguments, and the experiment's
``initial_ctx`` for ``setup(ctx)``) and calls ``setup()`` once; the runs stay Ray tasks
and send their calls to the pool (see :mod:`crystallize_ray._router`).

Sizing and resources come from the step's class attributes, overridable per backend
with ``RayExecution(heavy={"ModelStep": {...}})``:

=================  =================================================================
``pool_size``      actors; default as many as the step's resources allow in the
                   cluster (after one task's worth is kept for the runs themselves),
                   at most the number of runs
``num_cpus``       CPUs each actor holds (default 1)
``num_gpus``       GPUs each actor holds (default 0)
``resources``      custom resources each actor holds, e.g. ``{"accelerator": 1}``
``max_concurrency`` calls one actor runs at once (default 1)
``max_restarts``   how often Ray restarts an actor whose process died (default 5)
=================  =================================================================

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
import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crystallize.backend import WAIT_SLICE_SECONDS, ConfigurationError, is_int, serialize_step

from ._host import CONTROL_METHODS, SETUP_ATTEMPTS, StepHost
from ._router import PoolHandle

__all__ = [
    "POOL_OPTIONS",
    "PoolFailure",
    "PoolSpec",
    "Pools",
    "check_pool_option",
    "heavy_specs",
    "pools",
    "with_runtime_env",
]

log = logging.getLogger("crystallize_ray")

#: The options a heavy step's pool takes, as class attributes or in ``heavy=``.
POOL_OPTIONS = ("pool_size", "num_cpus", "num_gpus", "resources", "max_concurrency", "max_restarts")
_DEFAULTS: dict[str, Any] = {
    "pool_size": None,
    "num_cpus": 1,
    "num_gpus": 0,
    "resources": None,
    "max_concurrency": 1,
    "max_restarts": 5,
}
#: Calls an actor holds beyond those running, counted in the load it reports.
WAITING_CALLS = 4
#: How long retiring a pool waits for its actors' teardown() before killing them.
RETIRE_SECONDS = 10.0
#: How long a reused pool's actors may take to answer a ping before they count as dead.
PING_SECONDS = 5.0


@dataclass(frozen=True)
class PoolSpec:
    """One heavy step's pool as this ``run()`` wants it.

    Attributes:
        indexes: the pipeline positions of the step (one instance may appear twice).
        name: the step's name, for messages.
        qualified: its class's qualified name: a pool with the same one but another
            key holds an outdated recipe.
        recipe: ``serialize_step(step, initial_ctx)``.
        key: digest of the recipe and the resources: equal keys share a pool.
    """

    indexes: tuple[int, ...]
    name: str
    qualified: str
    recipe: bytes
    key: str
    pool_size: int | None
    num_cpus: float
    num_gpus: float
    resources: dict[str, float]
    max_concurrency: int
    max_restarts: int
    runtime_env: dict[str, Any] | None = None

    def bundle(self) -> dict[str, float]:
        """What one actor holds: its placement group's only bundle."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {name: amount for name, amount in wanted.items() if amount > 0}


@dataclass
class PoolFailure:
    """Why a pool is not there for this ``run()``: recorded on every run that needed it.

    Attributes:
        where: the ``RunError.step`` to record, ``"<Step>.setup"``.
        type: the exception's type name (``"PoolPlacementError"`` when not placed).
        message: what happened and what to do.
        traceback: the actor's traceback of the failing ``setup()``, if any.
    """

    where: str
    type: str
    message: str
    traceback: str = ""


def check_pool_option(name: str, value: Any) -> str | None:
    """What ``value`` should be for pool option ``name``; ``None`` when it is fine."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0

    if name == "pool_size":
        return None if value is None or is_int(value, 1) else "None or an integer >= 1"
    if name in ("num_cpus", "num_gpus"):
        return None if number(value) else "a number >= 0"
    if name == "resources":
        ok = value is None or (
            isinstance(value, Mapping) and all(isinstance(k, str) and number(v) for k, v in value.items())
        )
        return None if ok else "None or a mapping of resource names to numbers >= 0"
    if name == "max_concurrency":
        return None if is_int(value, 1) else "an integer >= 1"
    if name == "max_restarts":
        return None if is_int(value, -1) else "an integer >= -1 (-1: unlimited)"
    return f"one of the pool options {', '.join(POOL_OPTIONS)}"


def heavy_specs(experiment: Any, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, PoolSpec]:
    """The pools ``experiment`` needs: one per distinct heavy step, by key.

    Args:
        experiment: the job about to be shipped (its cache already resolved).
        overrides: ``RayExecution(heavy=...)``: a step's class name (or qualified
            name) -> options, which win over its class attributes.

    Raises:
        SerializationError: a heavy step cannot be pickled (before any work).
    """
    found: dict[str, PoolSpec] = {}
    for index, step in enumerate(experiment.pipeline.steps):
        if not getattr(step, "heavy", False):
            continue
        cls = type(step)
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        chosen = dict(overrides.get(cls.__name__) or overrides.get(qualified) or {})
        options = {name: chosen.get(name, getattr(cls, name, _DEFAULTS[name])) for name in POOL_OPTIONS}
        for name, value in options.items():
            expected = check_pool_option(name, value)
            if expected:
                raise ConfigurationError(f"RayExecution (heavy step {step.name!r})", name, value, expected)
        options["resources"] = dict(options["resources"] or {})
        recipe = serialize_step(step, dict(experiment.initial_ctx), backend="Ray")
        digest = hashlib.blake2b(recipe, digest_size=16)
        digest.update(
            repr(
                sorted({k: options[k] for k in ("num_cpus", "num_gpus", "max_concurrency", "max_restarts")}.items())
            ).encode()
        )
        digest.update(repr(sorted(options["resources"].items())).encode())
        key = digest.hexdigest()
        if key in found:
            spec = found[key]
            found[key] = PoolSpec(**{**spec.__dict__, "indexes": (*spec.indexes, index)})
            continue
        found[key] = PoolSpec(
            indexes=(index,),
            name=step.name,
            qualified=qualified,
            recipe=recipe,
            key=key,
            pool_size=options["pool_size"],
            num_cpus=options["num_cpus"],
            num_gpus=options["num_gpus"],
            resources=options["resources"],
            max_concurrency=options["max_concurrency"],
            max_restarts=options["max_restarts"],
        )
    return found


def with_runtime_env(specs: dict[str, PoolSpec], runtime_env: Mapping[str, Any] | None) -> dict[str, PoolSpec]:
    """``specs`` whose actors also get ``runtime_env`` (keys the job lacks); new keys."""
    if not runtime_env:
        return specs
    changed = {}
    for spec in specs.values():
        key = hashlib.blake2b(f"{spec.key}:{sorted(runtime_env.items())!r}".encode(), digest_size=16).hexdigest()
        changed[key] = dataclasses.replace(spec, key=key, runtime_env=dict(runtime_env))
    return changed


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
            starved = _starved(ray, specs, sizes, task_bundle)
            if starved is not None:
                return {}, starved
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
                    f"{spec.name}.setup", "PoolPlacementError", _unplaceable(ray, spec, size, timeout)
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
                    answer = {"ok": False, "failure": (type(exc).__name__, _first_line(exc), str(exc), 1)}
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


def _starved(
    ray: Any, specs: Mapping[str, PoolSpec], sizes: Mapping[str, int], task_bundle: Mapping[str, float]
) -> PoolFailure | None:
    """A failure when the pools would leave no room for even one of the runs' tasks.

    The runs are tasks that call the pools: with every CPU held by actors, none could
    start, and the experiment would wait forever.
    """
    total = ray.cluster_resources()
    for name, need in task_bundle.items():
        held = sum(spec.bundle().get(name, 0.0) * sizes[key] for key, spec in specs.items())
        if held > 0 and held + need > total.get(name, 0.0) + 1e-9:
            spec = next(s for k, s in specs.items() if s.bundle().get(name, 0.0) > 0)
            return PoolFailure(
                f"{spec.name}.setup",
                "PoolPlacementError",
                f"The actor pools would hold {held:g} of the cluster's {total.get(name, 0.0):g} {name}, "
                f"leaving none for the runs' tasks (each needs {name}={need:g}), which would then wait "
                f"forever. Lower pool_size or num_cpus in RayExecution(heavy={{{spec.name!r}: {{...}}}}), "
                f"or the tasks' own RayExecution(num_cpus=...).",
            )
    return None


def _remote_host(ray: Any) -> Any:
    """StepHost as a Ray actor class whose control methods never wait behind calls."""
    for name in CONTROL_METHODS:
        ray.method(concurrency_group="control")(getattr(StepHost, name))
    return ray.remote(concurrency_groups={"control": len(CONTROL_METHODS)})(StepHost)


def _unplaceable(ray: Any, spec: PoolSpec, size: int, timeout: float) -> str:
    """Which resource keeps an actor of ``spec`` from being placed, in words."""
    total, free = ray.cluster_resources(), ray.available_resources()
    bundle = spec.bundle()
    reasons = []
    for name, amount in bundle.items():
        have, idle = total.get(name, 0.0), free.get(name, 0.0)
        if have < amount:
            reasons.append(f"each actor needs {name}={amount:g} and the cluster has {have:g} {name} in all")
        elif idle < amount:
            reasons.append(
                f"{name}: each actor needs {amount:g}, {idle:g} of the cluster's {have:g} are free "
                f"(held by other tasks or actors)"
            )
    why = "; ".join(reasons) or f"its resources {bundle} were not granted"
    return (
        f"The actor pool of step {spec.name!r} ({size} actor(s), each {bundle}) could not be placed "
        f"within {timeout:g} s: {why}. Lower pool_size / num_cpus / num_gpus with "
        f"RayExecution(heavy={{{spec.name!r}: {{...}}}}), add nodes that have the resource, or "
        f"raise placement_timeout=."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
