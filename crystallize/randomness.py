"""Random generators a cacheable step draws from: keyed by their state at entry, replayed after.

A step that draws random numbers depends on the generator's state when it starts, and
leaves the generator advanced. The step cache treats both like context values: the
state at entry of every generator the step *consumed* is part of what its entry
depends on (a pseudo-read ``("crystallize", "random", <source>)``), and the state
after the step is stored with the entry and restored on a hit, so a later uncached
step draws exactly what it would have drawn had the cached step run.

The sources, captured only for a cacheable step about to run with a cache:

* ``random``: Python's global generator (:func:`random.getstate`);
* ``numpy``: numpy's global (legacy) generator, only when ``numpy.random`` is
  already imported;
* ``torch``: torch's global CPU generator, only when ``torch`` is already imported;
* ``ctx:<key>``: every generator held in the run's context (``ctx["rng"]``,
  ``ctx["numpy_rng"]`` from :class:`~crystallize.SeedPlugin`, or your own): a
  :class:`random.Random`, a numpy ``Generator`` or ``RandomState``, a
  ``torch.Generator``.

Consumption is seen by comparing each state at exit with the state at entry, so a
step that draws nothing keeps one entry for every seed. The global generators are
shared by every thread: under a thread backend (or an async step that awaits while
other runs draw) a step drawing from them is not reproducible, and another run
reseeding them can make a step look as if it had drawn (an extra miss, never a wrong
hit). Per-run generators in the context have neither problem.

Example:
    >>> import random
    >>> from crystallize import FrozenContext
    >>> ctx = FrozenContext({"rng": random.Random(1)})
    >>> taken = capture(ctx)
    >>> _ = ctx.peek("rng").random()
    >>> [key for key, _, _ in consumed(taken)]
    [('crystallize', 'random', 'ctx:rng')]
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["PREFIX", "capture", "consumed", "current_state", "restore", "source_name"]

#: The first two items of every randomness pseudo-read key.
PREFIX = ("crystallize", "random")
_GLOBAL_RANDOM = (*PREFIX, "random")
_GLOBAL_NUMPY = (*PREFIX, "numpy")
_GLOBAL_TORCH = (*PREFIX, "torch")
_GLOBALS = (_GLOBAL_RANDOM, _GLOBAL_NUMPY, _GLOBAL_TORCH)


def source_name(key: tuple[str, ...]) -> str:
    """The readable source of a pseudo-read key: ``random``, ``numpy``, ``ctx:rng``..."""
    return key[2]


def capture(ctx: Any, *, globals_too: bool = True) -> list[tuple[tuple[str, ...], Any, Any]]:
    """The state of every generator a step could draw from, as ``(key, owner, state)``.

    ``globals_too=False``: only the context's generators (a caller that already
    knows the global generators' states, e.g. a step hosted elsewhere).
    """
    taken: list[tuple[tuple[str, ...], Any, Any]] = []
    if globals_too:
        taken.append((_GLOBAL_RANDOM, random, random.getstate()))
        np_random = sys.modules.get("numpy.random")
        if np_random is not None:
            taken.append((_GLOBAL_NUMPY, np_random, np_random.get_state()))
        torch = sys.modules.get("torch")
        if torch is not None:
            taken.append((_GLOBAL_TORCH, torch, _torch_bytes(torch.get_rng_state())))
    for name, value in ctx._stored_items():
        if _is_generator(value):
            taken.append(((*PREFIX, f"ctx:{name}"), value, _state(value)))
    return taken


def consumed(
    taken: Iterable[tuple[tuple[str, ...], Any, Any]],
) -> list[tuple[tuple[str, ...], Any, Any]]:
    """``(key, state at entry, state now)`` for each captured generator that moved."""
    moved = []
    for key, owner, before in taken:
        after = _global_state(key, owner) if key in _GLOBALS else _state(owner)
        if not _same(before, after):
            moved.append((key, before, after))
    return moved


def current_state(key: tuple[str, ...], ctx: Any) -> Any:
    """The state the source of ``key`` is in now; ``None`` if it is gone or not a generator."""
    if key == _GLOBAL_RANDOM:
        return random.getstate()
    if key in _GLOBALS:
        module = sys.modules.get("numpy.random" if key == _GLOBAL_NUMPY else "torch")
        return None if module is None else _global_state(key, module)
    value = ctx.peek(key[2][len("ctx:") :]) if key[2].startswith("ctx:") else None
    return _state(value) if _is_generator(value) else None


def restore(key: tuple[str, ...], state: Any, ctx: Any) -> None:
    """Put the source of ``key`` into ``state`` (a hit replaying the step's draws).

    Raises:
        LookupError: the source is not there to restore (a context generator gone, or
            numpy/torch not imported): the entry cannot be replayed.
    """
    if key == _GLOBAL_RANDOM:
        random.setstate(state)
        return
    if key == _GLOBAL_NUMPY:
        _module("numpy.random", key).set_state(state)
        return
    if key == _GLOBAL_TORCH:
        torch = _module("torch", key)
        torch.set_rng_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        return
    value = ctx.peek(key[2][len("ctx:") :])
    if not _is_generator(value):
        raise LookupError(f"The context holds no generator at {key[2][4:]!r} to restore.")
    _set_state(value, state)


def _module(name: str, key: tuple[str, ...]) -> Any:
    module = sys.modules.get(name)
    if module is None:
        raise LookupError(f"{name} is not imported, so randomness source {key[2]!r} cannot be restored.")
    return module


def _global_state(key: tuple[str, ...], owner: Any) -> Any:
    if key == _GLOBAL_RANDOM:
        return owner.getstate()
    if key == _GLOBAL_NUMPY:
        return owner.get_state()
    return _torch_bytes(owner.get_rng_state())


def _is_generator(value: Any) -> bool:
    if isinstance(value, random.Random):
        return not isinstance(value, random.SystemRandom)  # no state to key or restore
    np_random = sys.modules.get("numpy.random")
    if np_random is not None and isinstance(value, (np_random.Generator, np_random.RandomState)):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Generator)


def _state(generator: Any) -> Any:
    if isinstance(generator, random.Random):
        return generator.getstate()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None and isinstance(generator, np_random.Generator):
        return generator.bit_generator.state
    if np_random is not None and isinstance(generator, np_random.RandomState):
        return generator.get_state()
    return _torch_bytes(generator.get_state())  # a torch.Generator


def _set_state(generator: Any, state: Any) -> None:
    np_random = sys.modules.get("numpy.random")
    if isinstance(generator, random.Random):
        generator.setstate(state)
    elif np_random is not None and isinstance(generator, np_random.Generator):
        generator.bit_generator.state = state
    elif np_random is not None and isinstance(generator, np_random.RandomState):
        generator.set_state(state)
    else:  # a torch.Generator
        torch = sys.modules["torch"]
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


def _torch_bytes(tensor: Any) -> bytes:
    """A torch generator's state (a uint8 tensor) as bytes: hashable, comparable, small."""
    try:
        return tensor.numpy().tobytes()
    except Exception:  # torch built without numpy
        return bytes(tensor.tolist())


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (
        ValueError,
        TypeError,
    ):  # containers holding numpy arrays compare elementwise
        return _same_deep(a, b)


def _same_deep(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_deep(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_deep(x, y) for x, y in zip(a, b))
    if hasattr(a, "tobytes") and hasattr(a, "dtype"):  # a numpy array
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    return bool(a == b)
