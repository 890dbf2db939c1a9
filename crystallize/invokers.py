"""Steps hosted elsewhere: a call shipped with what the step needs, its effects replayed in the run.

A backend may keep a step somewhere other than the run that reaches it:
``crystallize_ray`` keeps each heavy step in a pool of Ray actors, so its model loads
once per actor. The run's step loop then does not call the step itself. It looks the
cache up as usual, and on a miss hands an *invoker* the step, its input and a
:class:`StepCall` (the context as the step would find it, and the state of the global
random generators). The invoker returns (or returns an awaitable of) the
:class:`StepEffects` the call produced where the step lives — output, metrics, ctx
additions, the keys it read, artifacts, the generators' states after it — and the loop
applies them to the run's context the way a cache hit replays an entry. Provenance,
cache entries and results are then exactly what calling the step in the run would have
made, so results equal :class:`~crystallize.SerialExecution`'s under a seed.

The pieces:

* driver: :func:`host_steps` — a copy of the experiment whose hosted steps are
  :class:`HostedStep` stand-ins (name, parameters and cache identity, never the
  resource), for shipping to the processes that run the runs;
* run: ``steps_set_up(experiment, invokers={index: invoker})`` — those steps are not
  set up in this process, and their calls go to the invoker;
* where the step lives: :func:`call_step` / :func:`acall_step` — build the step's
  context from the :class:`StepCall`, call it, and record its effects.

Example:
    An invoker that calls the step in this same process, through the protocol:

    >>> from crystallize import Experiment, PipelineStep, SeedPlugin
    >>> from crystallize.backend import steps_set_up
    >>> class Noisy(PipelineStep):
    ...     def __call__(self, data, ctx):
    ...         ctx.add("drawn", ctx["rng"].random())
    ...         return data, {"value": data}
    >>> step = Noisy()
    >>> exp = Experiment(lambda ctx: 1, [step], plugins=[SeedPlugin(seed=3)])
    >>> job = host_steps(exp, [0])
    >>> with steps_set_up(job, invokers={0: lambda s, data, call: call_step(step, data, call)}) as host:
    ...     run = host.run(0, "baseline")
    >>> run.metrics, run.provenance[0].added
    ({'value': [1]}, ('drawn',))
"""

from __future__ import annotations

import array
import copy
import inspect
import io
import pickle
import random
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._drive import Loop, adrive, drive
from .context import _ACTIVE, FrozenContext, _StepRecorder
from .hashing import UnhashableValueError
from .randomness import _same, capture, consumed, current_state, restore
from .steps import FunctionStep, PipelineStep

__all__ = [
    "HostedStep",
    "StepCall",
    "StepEffects",
    "StepInvoker",
    "acall_step",
    "call_step",
    "host_steps",
    "replay_effects",
    "step_call",
]


@dataclass
class StepCall:
    """What a step hosted elsewhere needs of the run: shipped with each call.

    It pickles to one compact byte string (random generators' states as raw bytes)
    when plain pickle can carry it, which is what a transport such as Ray moves
    fastest; otherwise field by field.

    Attributes:
        values: the run's context keys and values, as the step would find them.
        metrics: the metrics recorded so far (name -> values), for steps that read them.
        params: the parameters the run resolved for the step (function steps).
        randomness: the state of each global random generator imported in the run
            (``random``, and ``numpy``/``torch`` when imported), as
            ``(pseudo-key, state)``: the step draws from them as it would in the run.
    """

    values: dict[str, Any]
    metrics: dict[str, list[Any]]
    params: dict[str, Any] = field(default_factory=dict)
    randomness: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (self.values, self.metrics, self.params, _compact_states(self.randomness))
        packed = _pack(fields)
        if packed is None:
            return (StepCall, (self.values, self.metrics, self.params, self.randomness))
        return (_call_from_wire, (packed,))


@dataclass
class StepEffects:
    """What one call of a step did, recorded where it ran; replayed into the run's context.

    Attributes:
        output: what the step returned.
        metrics: ``(name, value)`` for each metric it recorded, in order.
        added: ``(key, value)`` for each context key it added.
        reads: the keys (and pseudo-keys) it read, as ``StepRecord.reads`` lists them.
        artifacts: the artifacts it wrote.
        randomness: pseudo-key -> state after the step, for each generator it moved.
        served_by: where the call ran, for provenance (e.g. a Ray actor and node).
    """

    output: Any
    metrics: list[tuple[str, Any]] = field(default_factory=list)
    added: list[tuple[str, Any]] = field(default_factory=list)
    reads: tuple[Any, ...] = ()
    artifacts: list[Any] = field(default_factory=list)
    randomness: dict[tuple[str, ...], Any] = field(default_factory=dict)
    served_by: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # The output travels as itself (a transport may move arrays without a copy);
        # the rest, small, as one compact byte string.
        rest = (
            self.metrics,
            self.added,
            self.reads,
            self.artifacts,
            _compact_states(list(self.randomness.items())),
            self.served_by,
        )
        packed = _pack(rest)
        if packed is None:
            return (
                StepEffects,
                (self.output, self.metrics, self.added, self.reads, self.artifacts, self.randomness, self.served_by),
            )
        return (_effects_from_wire, (self.output, packed))


# -- on the wire ----------------------------------------------------------------------


class _Packer(pickle.Pickler):
    """Plain pickle, with random generators as their bare state (``random.Random``'s as
    raw bytes): rebuilding a numpy ``Generator`` that way takes half the time."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is random.Random:
            return (_random_from, (_compact_random(obj.getstate()),))
        np_random = sys.modules.get("numpy.random")
        if np_random is not None and type(obj) is np_random.Generator:
            bits = obj.bit_generator
            if getattr(np_random, type(bits).__name__, None) is type(bits):
                return (_numpy_generator_from, (type(bits).__name__, bits.state))
        return NotImplemented


def _numpy_generator_from(name: str, state: Any) -> Any:
    import numpy.random

    bits = getattr(numpy.random, name)(0)  # a fixed seed: no OS entropy to read
    bits.state = state
    return numpy.random.Generator(bits)


def _pack(obj: Any) -> bytes | None:
    buffer = io.BytesIO()
    try:
        _Packer(buffer, protocol=5).dump(obj)
    except Exception:  # something only cloudpickle carries: the transport's pickler takes it
        return None
    return buffer.getvalue()


def _compact_random(state: Any) -> Any:
    version, words, gauss = state
    return ("mt", version, array.array("I", words).tobytes(), gauss)


def _expand_random(state: Any) -> Any:
    if isinstance(state, tuple) and len(state) == 4 and state[0] == "mt":
        return (state[1], tuple(array.array("I", state[2])), state[3])
    return state


def _random_from(state: Any) -> random.Random:
    generator = random.Random()
    generator.setstate(_expand_random(state))
    return generator


def _compact_states(states: list[tuple[tuple[str, ...], Any]]) -> list[tuple[tuple[str, ...], Any]]:
    return [(key, _compact_random(state) if key[2] == "random" else state) for key, state in states]


def _expand_states(states: list[tuple[tuple[str, ...], Any]]) -> list[tuple[tuple[str, ...], Any]]:
    return [(key, _expand_random(state) if key[2] == "random" else state) for key, state in states]


def _call_from_wire(packed: bytes) -> StepCall:
    values, metrics, params, randomness = pickle.loads(packed)
    return StepCall(values, metrics, params, _expand_states(randomness))


def _effects_from_wire(output: Any, packed: bytes) -> StepEffects:
    metrics, added, reads, artifacts, randomness, served_by = pickle.loads(packed)
    return StepEffects(output, metrics, added, reads, artifacts, dict(_expand_states(randomness)), served_by)


#: ``invoker(step, data, call)`` -> :class:`StepEffects`, or an awaitable of them.
#: ``step`` is the run's :class:`HostedStep` stand-in (its ``name``, ``params``).
StepInvoker = Callable[[PipelineStep, Any, StepCall], "StepEffects | Awaitable[StepEffects]"]


# -- in the run ------------------------------------------------------------------------


def step_call(ctx: FrozenContext, params: Mapping[str, Any]) -> StepCall:
    """The :class:`StepCall` for a step about to be called with ``ctx`` (used by the step loop)."""
    return StepCall(
        values=dict(ctx._stored_items()),
        metrics={name: list(values) for name, values in ctx.metrics._values.items() if values},
        params=dict(params),
        randomness=[(key, state) for key, _, state in capture(_NO_CONTEXT)],
    )


def replay_effects(effects: StepEffects, call: StepCall, ctx: FrozenContext) -> Any:
    """Apply what a hosted step did to the run's context; return its output.

    The reads are noted first, with the values the step found (nothing has changed
    since it was called), so a cacheable hosted step's entry is keyed exactly as if it
    had run here. The global generators are put where the step left them, or back where
    they were when it was called: another run in this process may have drawn from them
    meanwhile.
    """
    if not isinstance(effects, StepEffects):
        raise TypeError(f"A step invoker must return StepEffects, got {type(effects).__name__}.")
    recorder = ctx._recorder
    if recorder is not None:
        for key in effects.reads:
            recorder.note(key, ctx._peek(key))
    for key, state in call.randomness:
        after = effects.randomness.get(key)
        if after is not None:
            restore(key, after, ctx)
        elif not _same_state(current_state(key, ctx), state):  # another run here drew meanwhile
            restore(key, state, ctx)
    for key, state in effects.randomness.items():
        if key[2].startswith("ctx:"):
            restore(key, state, ctx)
    ctx._replay(effects.metrics, effects.added, effects.artifacts)
    return effects.output


# -- where the step lives ---------------------------------------------------------------


def call_step(step: PipelineStep, data: Any, call: StepCall) -> StepEffects:
    """Call ``step`` on ``data`` in a context rebuilt from ``call``; record what it did.

    Where a backend hosts a step (a worker, an actor), this is the whole call.
    An async step is run to completion on a private event loop.

    Raises:
        Exception: whatever the step raised, unchanged (the backend sends it back).
    """
    return drive(_recorded(step, data, call))


async def acall_step(step: PipelineStep, data: Any, call: StepCall) -> StepEffects:
    """Like :func:`call_step`, awaiting an async step in the running event loop."""
    return await adrive(_recorded(step, data, call))


def _recorded(step: PipelineStep, data: Any, call: StepCall) -> Loop:
    ctx = FrozenContext()
    ctx._data.update(call.values)  # travelled as a copy: nobody else holds these values
    for name, values in call.metrics.items():
        ctx.metrics._values[name] = list(values)
    for key, state in call.randomness:
        _restore_global(key, state, ctx)
    # The context's generators as the step finds them (the globals' states are the call's).
    taken = [(key, owner, state) for key, owner, state in capture(ctx, globals_too=False)]
    recorder = _StepRecorder(None)
    ctx._recorder = recorder
    token = _ACTIVE.set(ctx)
    try:
        if isinstance(step, FunctionStep):
            output = step.call_resolved(data, ctx, dict(call.params))
        else:
            output = step(data, ctx)
        if inspect.isawaitable(output):
            output = yield output
    finally:
        ctx._recorder = None
        _ACTIVE.reset(token)
    moved = {key: after for key, _, after in consumed(taken)}  # the run restores the others
    for key, before in call.randomness:
        after = current_state(key, ctx)
        if after is not None and not _same_state(before, after):
            moved[key] = after
    return StepEffects(
        output=output,
        metrics=list(recorder.metrics),
        added=list(recorder.added),
        reads=tuple(recorder.reads),
        artifacts=list(recorder.artifacts),
        randomness=moved,
    )


def _same_state(a: Any, b: Any) -> bool:
    """Whether two generator states are equal; numpy's arrays compared as bytes (fast)."""
    if hasattr(a, "tobytes") and hasattr(b, "tobytes") and hasattr(a, "dtype"):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    try:
        return bool(a == b)  # plain states (tuples of ints) compare in C
    except (ValueError, TypeError):  # a container holding arrays
        if type(a) is tuple and type(b) is tuple and len(a) == len(b):
            return all(_same_state(x, y) for x, y in zip(a, b))
        return _same(a, b)


def _restore_global(key: tuple[str, ...], state: Any, ctx: FrozenContext) -> None:
    """Seed a global generator as the run had it; import numpy/torch here if the run had."""
    if key[2] in ("numpy", "torch"):
        try:
            __import__("numpy.random" if key[2] == "numpy" else "torch")
        except ImportError:  # the step cannot draw from what is not installed here
            return
    restore(key, state, ctx)


_NO_CONTEXT = FrozenContext()  # capture() of the global generators only


# -- in the driver -------------------------------------------------------------------


class HostedStep(PipelineStep):
    """Stands in a shipped experiment for a step a backend hosts elsewhere.

    It carries what the run needs of the step — its name, parameters, whether it is
    async and cacheable, and its cache identity as the driver computed it for this
    ``run()`` — and never the step itself: the processes that run the runs do not
    build it or set it up. Calling it without an invoker is an error.

    Args:
        step: the real step, in the driver.
    """

    _records_recipe = False

    def __init__(self, step: PipelineStep) -> None:
        self.hosted_name = step.name
        self.hosted_type = type(step).__name__
        self.cacheable = step.cacheable
        self.version = step.version
        self.heavy = step.heavy
        self._params = dict(step.params)
        self._parameter_names = tuple(step.parameter_names)
        self._qualified = step.qualified_name()
        self._async = step.is_async()
        self._hosted_identity: tuple[str, str] | tuple[str, str, None] | None = None
        if step.cacheable:
            step.forget_cache_identity()  # the code as it is now, for this run()
            try:
                self._hosted_identity = step.cache_identity()
            except UnhashableValueError as exc:
                self._hosted_identity = (exc.value_type, exc.reason, None)

    @property
    def name(self) -> str:
        return self.hosted_name

    @property
    def params(self) -> Mapping[str, Any]:
        return dict(self._params)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return self._parameter_names

    def resolve_params(self, ctx: FrozenContext) -> dict[str, Any]:
        return dict(self._params)

    def qualified_name(self) -> str:
        return self._qualified

    def is_async(self) -> bool:
        return self._async

    def _identity(self) -> tuple[str, str] | UnhashableValueError:
        found = self._hosted_identity
        if found is None:
            raise RuntimeError(f"Step {self.hosted_name!r} is not cacheable; it has no cache identity.")
        if len(found) == 3:
            return UnhashableValueError(found[0], found[1])
        return found  # type: ignore[return-value]

    def __call__(self, data: Any, ctx: FrozenContext) -> Any:
        raise RuntimeError(
            f"Step {self.hosted_name!r} is hosted by the execution backend (e.g. in a Ray "
            f"actor pool), but this process has no invoker for it. A backend that ships "
            f"host_steps(...) must run it with steps_set_up(experiment, invokers=...)."
        )

    def __repr__(self) -> str:
        return f"HostedStep({self.hosted_name})"


def host_steps(experiment: Any, indexes: Iterable[int]) -> Any:
    """A shallow copy of ``experiment`` whose steps at ``indexes`` are :class:`HostedStep` s.

    Call it in the driver, once per ``run()``, before shipping the experiment to the
    processes that run the runs; the real steps go wherever the backend hosts them.

    Raises:
        IndexError: an index is not a position in the pipeline.
    """
    chosen = set(indexes)
    steps = list(experiment.pipeline.steps)
    for index in chosen:
        steps[index] = HostedStep(steps[index])
    job = copy.copy(experiment)
    job.pipeline = copy.copy(experiment.pipeline)
    job.pipeline.steps = tuple(steps)
    return job
