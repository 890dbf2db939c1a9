"""Treatments: named changes to a run's context, each one experimental condition."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .context import FrozenContext

__all__ = ["BASELINE", "Treatment", "treatment"]

#: The condition name of runs with no treatment applied.
BASELINE = "baseline"


class Treatment:
    """A named condition: a mapping of context values, or a function that adds them.

    A treatment may set a key that the experiment's ``initial_ctx`` also sets: the
    ``initial_ctx`` value is the baseline's configuration, and the treatment's value
    wins for its own condition. Any other key can only be added once.

    Args:
        name: the condition's name (not ``"baseline"``).
        apply: a mapping of keys to values, or a callable ``apply(ctx)`` that calls
            ``ctx.add(...)``.

    Example:
        >>> t = Treatment("double", {"factor": 2.0})
        >>> ctx = FrozenContext()
        >>> t.apply(ctx)
        >>> ctx["factor"]
        2.0
    """

    def __init__(self, name: str, apply: Mapping[str, Any] | Callable[[FrozenContext], Any]) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"A treatment name must be a non-empty string, got {name!r}.")
        if isinstance(apply, Mapping):
            self._mapping: Mapping[str, Any] | None = MappingProxyType(dict(apply))
            self._fn: Callable[[FrozenContext], Any] | None = None
        elif callable(apply):
            self._mapping, self._fn = None, apply
        else:
            raise TypeError(
                f"Treatment {name!r} needs a mapping of context values or a callable "
                f"apply(ctx), got {type(apply).__name__}."
            )
        self.name = name

    @property
    def mapping(self) -> Mapping[str, Any] | None:
        """The values this treatment sets, when it was given as a mapping."""
        return self._mapping

    def apply(self, ctx: FrozenContext) -> None:
        """Add this treatment's values to ``ctx``."""
        if self._mapping is not None:
            for key, value in self._mapping.items():
                ctx.add(key, value)
        else:
            self._fn(ctx)  # type: ignore[misc]

    def __repr__(self) -> str:
        what = dict(self._mapping) if self._mapping is not None else self._fn
        return f"Treatment({self.name!r}, {what!r})"


def treatment(
    name: str, apply: Mapping[str, Any] | Callable[[FrozenContext], Any] | None = None
) -> Any:
    """Make a :class:`Treatment`; without ``apply`` it decorates a function.

    Example:
        >>> high = treatment("high_lr", {"lr": 0.1})
        >>> @treatment("warmup")
        ... def warmup(ctx):
        ...     ctx.add("warmup_steps", 100)
        >>> warmup.name
        'warmup'
    """
    if apply is None:
        return lambda fn: Treatment(name, fn)
    return Treatment(name, apply)
