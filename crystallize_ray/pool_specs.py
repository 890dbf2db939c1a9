"""What a heavy step's actor pool is: its options, its spec for one run(), and why it may be missing.

A ``heavy = True`` class step's pool is sized and placed from these options, given as
class attributes of the step or per backend with
``RayExecution(heavy={"ModelStep": {...}})`` (see :mod:`crystallize_ray.pools` for what
is done with them):

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
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crystallize.backend import ConfigurationError, is_int, serialize_step

__all__ = [
    "POOL_OPTIONS",
    "PoolFailure",
    "PoolSpec",
    "check_pool_option",
    "first_line",
    "heavy_specs",
    "starved",
    "unplaceable",
    "with_runtime_env",
]

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


def starved(
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


def unplaceable(ray: Any, spec: PoolSpec, size: int, timeout: float) -> str:
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
