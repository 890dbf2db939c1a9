"""Plugins: hooks around an experiment's runs, and the built-in Logging and Seed plugins.

Hooks, in the order they are called::

    before_run(experiment)              driver, once per Experiment.run()
      ── for each run, wherever the backend executes it ──
      before_replicate(experiment, ctx) after the treatment is applied, before the
                                        datasource; may ctx.add(...) keys
      after_replicate(experiment, ctx)  after the last step (also on failure)
      ── back in the driver ──
      on_run_result(experiment, run)    as each RunResult arrives, in completion order
    after_run(experiment, result)       driver, once, with the aggregated Result

Replicate hooks run in worker processes under process and Ray backends, on a copy of
the plugin: state they change there does not travel back. Put anything the driver
needs into ``ctx`` (metrics, artifacts) so it comes back inside the RunResult.

Hook signatures are checked when a plugin is given to an Experiment, so a typo in a
hook name or a wrong argument list fails early, naming the plugin and the hook.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import random
import secrets
import sys
import threading
from collections.abc import Callable
from typing import Any

from .context import FrozenContext
from .hashing import hash_struct
from .result import Result, RunResult

__all__ = ["BasePlugin", "LoggingPlugin", "SeedPlugin", "check_plugin"]

HOOKS: dict[str, tuple[str, ...]] = {
    "before_run": ("experiment",),
    "before_replicate": ("experiment", "ctx"),
    "after_replicate": ("experiment", "ctx"),
    "on_run_result": ("experiment", "run"),
    "after_run": ("experiment", "result"),
}


class BasePlugin:
    """Base class for plugins; override only the hooks you need (see module docs)."""

    def before_run(self, experiment: Any) -> None:
        """Called in the driver before any run of ``Experiment.run()`` starts."""

    def before_replicate(self, experiment: Any, ctx: FrozenContext) -> None:
        """Called inside each run, after its treatment, before its datasource."""

    def after_replicate(self, experiment: Any, ctx: FrozenContext) -> None:
        """Called inside each run after the pipeline, whether it succeeded or not."""

    def on_run_result(self, experiment: Any, run: RunResult) -> None:
        """Called in the driver as each run's result arrives."""

    def after_run(self, experiment: Any, result: Result) -> None:
        """Called in the driver once every run has finished."""

    @property
    def name(self) -> str:
        return type(self).__name__


def check_plugin(plugin: Any) -> list[str]:
    """Problems with a plugin's hooks: misspelt hook names and wrong signatures."""
    problems = []
    name = type(plugin).__name__
    if not isinstance(plugin, BasePlugin):
        return [f"Plugin {plugin!r} is a {name}, not a BasePlugin subclass instance."]
    base = set(dir(BasePlugin))
    for attr in dir(type(plugin)):
        if attr in HOOKS or attr in base or attr.startswith("_"):
            continue
        near = difflib.get_close_matches(attr, HOOKS, n=1, cutoff=0.8)
        if attr.startswith(("before_", "after_", "on_")) or near:
            hint = f" Did you mean {near[0]}()?" if near else ""
            problems.append(
                f"Plugin {name} defines {attr}(), which is not a hook; hooks are: {', '.join(HOOKS)}.{hint}"
            )
    for hook, args in HOOKS.items():
        method = getattr(plugin, hook)
        try:
            inspect.signature(method).bind(*args)
        except TypeError:
            problems.append(
                f"Plugin {name}.{hook} must accept ({', '.join(args)}), "
                f"but its signature is {inspect.signature(method)}."
            )
    return problems


class LoggingPlugin(BasePlugin):
    """Log the start and end of an experiment and, if ``verbose``, every run.

    Args:
        level: the logging level for the messages.
        verbose: also log each run as its result arrives.
    """

    def __init__(self, level: int = logging.INFO, verbose: bool = False) -> None:
        self.level, self.verbose = level, verbose
        self.log = logging.getLogger("crystallize.experiment")

    def before_run(self, experiment: Any) -> None:
        self.log.log(self.level, "Experiment %r starting", experiment.name)

    def on_run_result(self, experiment: Any, run: RunResult) -> None:
        if self.verbose:
            status = "ok" if run.error is None else f"FAILED ({run.error.type})"
            self.log.log(self.level, "run r=%d %s: %s in %.3fs", run.replicate, run.condition, status, run.seconds)

    def after_run(self, experiment: Any, result: Result) -> None:
        self.log.log(
            self.level,
            "Experiment %r finished: %d runs, %d failed",
            experiment.name,
            len(result.runs),
            len(result.errors),
        )


def seed_for(seed: int, replicate: int) -> int:
    """The seed of replicate ``replicate`` under a base ``seed`` (a 32-bit integer)."""
    return int(hash_struct("seed", seed, replicate)[:8], 16)


def default_seed_fn(seed: int) -> None:
    """Seed ``random`` and, if numpy is already imported, numpy's global state."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed)


class SeedPlugin(BasePlugin):
    """Give each run a seed derived from ``(seed, replicate)`` only.

    Every condition of a replicate gets the same seed (common random numbers), on
    every backend. Inside a run:

    * ``ctx["seed"]``: the run's seed (an int);
    * ``ctx["rng"]``: a ``random.Random`` seeded with it;
    * ``ctx["numpy_rng"]``: a ``numpy.random.Generator`` seeded with it (only when
      numpy is installed).

    Prefer the per-run generators: they are reproducible under thread and async
    execution too, where the global ``random`` state is shared by concurrent runs.

    Args:
        seed: the base seed; ``None`` draws one per ``Experiment.run()`` (recorded in
            ``result.provenance["seed"]`` so the run can be repeated).
        seed_fn: called with the run's seed to seed other libraries' global state;
            default seeds ``random`` and numpy's global generator.

    Example:
        >>> plugin = SeedPlugin(seed=7)
        >>> plugin.seed_for(0) == plugin.seed_for(0) != plugin.seed_for(1)
        True
    """

    def __init__(self, seed: int | None = None, seed_fn: Callable[[int], Any] | None = None) -> None:
        self.seed = seed
        self.seed_fn = seed_fn or default_seed_fn
        self._drawn: int | None = None

    @property
    def base_seed(self) -> int | None:
        """The seed in force: the given one, or the one drawn for the current run()."""
        return self.seed if self.seed is not None else self._drawn

    def seed_for(self, replicate: int) -> int:
        """The seed replicate ``replicate`` gets."""
        base = self.base_seed
        if base is None:
            raise RuntimeError("SeedPlugin(seed=None) draws its seed when the experiment runs.")
        return seed_for(base, replicate)

    def before_run(self, experiment: Any) -> None:
        if self.seed is None:
            self._drawn = secrets.randbits(32)
        # Import numpy here, once, in the driver: several pool threads importing it
        # at the same moment in before_replicate see a half-initialised module.
        _import_numpy()

    def before_replicate(self, experiment: Any, ctx: FrozenContext) -> None:
        run_seed = self.seed_for(ctx.peek("replicate"))
        ctx.add("seed", run_seed)
        ctx.add("rng", random.Random(run_seed))
        numpy = sys.modules.get("numpy") or _import_numpy()
        if numpy is not None:
            ctx.add("numpy_rng", numpy.random.default_rng(run_seed))
        self.seed_fn(run_seed)


_NUMPY_LOCK = threading.Lock()


def _import_numpy() -> Any:
    """numpy if it is installed, imported under a lock; ``None`` otherwise."""
    with _NUMPY_LOCK:
        try:
            import numpy
        except ImportError:
            return None
        return numpy
