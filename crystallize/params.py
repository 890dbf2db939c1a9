"""Parameter injection and recipes, shared by steps, data sources and verifiers.

A *parameterised function* is a user function whose keyword parameters are filled,
in this order of precedence, from the value given when it was built (explicit), the
run's context (injected), or its default. Every value handed to the function is the
caller's own copy: editing a list parameter never changes the context, a later run,
or the function's default.

A *recipe* is how such a built object travels to another process: the factory and
its explicit parameters, never the function by name (a module attribute with the
function's name is the factory, not the function).

Example:
    >>> from crystallize import FrozenContext
    >>> def scale(data, ctx, *, factor=1.0, offset):
    ...     return data * factor + offset
    >>> sig = Signature(scale, first="data", kind="Step")
    >>> sig.resolve("scale", {"factor": 2.0}, FrozenContext({"offset": 1}))
    {'factor': 2.0, 'offset': 1}
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .context import FrozenContext, handed_out
from .errors import MissingParameterError, UnknownParameterError

__all__ = ["Signature", "rebuild"]

_MISSING = object()
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class Signature:
    """What a parameterised function accepts, read once when it is decorated.

    Args:
        fn: the user's function.
        first: the name of the first positional parameter, which is passed, not
            injected (a step's ``data``, a data source's ``ctx``).
        kind: ``"Step"``, ``"Data source"``... for messages.

    Attributes:
        names: the injectable parameter names, in order (never ``ctx``, ``*args``
            or ``**kwargs``).
        wants_ctx: whether ``ctx`` is among the parameters after the first.
        accepts_any: whether the function takes ``**kwargs`` (unknown explicit names
            are then passed through instead of refused).

    Raises:
        TypeError: the function cannot take the skipped parameters positionally, or
            an injectable parameter is positional-only.
    """

    __slots__ = ("fn", "kind", "names", "defaults", "wants_ctx", "accepts_any")

    def __init__(self, fn: Callable[..., Any], *, first: str, kind: str) -> None:
        self.fn, self.kind = fn, kind
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in _POSITIONAL:
            raise TypeError(
                f"{kind} function {fn.__qualname__!r} must take {first} as its first "
                f"positional parameter, e.g. def {fn.__name__}({first}, ..., *, param=1)."
            )
        self.wants_ctx = False
        self.accepts_any = False
        self.names: list[str] = []
        self.defaults: dict[str, Any] = {}
        for p in params[1:]:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                self.accepts_any = True
            if p.kind in _VARIADIC:
                continue
            if p.name == "ctx":
                self.wants_ctx = True
                continue
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise TypeError(
                    f"{kind} function {fn.__qualname__!r}: parameter {p.name!r} is "
                    f"positional-only; parameters must be passable by keyword."
                )
            self.names.append(p.name)
            if p.default is not inspect.Parameter.empty:
                self.defaults[p.name] = p.default

    def check_explicit(self, name: str, explicit: Mapping[str, Any]) -> None:
        """Refuse explicit names the function does not take.

        Raises:
            UnknownParameterError: (a ``TypeError``) listing the valid names.
        """
        if self.accepts_any:
            return
        unknown = [k for k in explicit if k not in self.names]
        if unknown:
            valid = ", ".join(self.names) or "(none)"
            raise UnknownParameterError(
                f"{self.kind} {name!r} got unknown parameter(s) "
                f"{', '.join(map(repr, unknown))}; its parameters are: {valid}."
            )

    def resolve(self, name: str, explicit: Mapping[str, Any], ctx: FrozenContext) -> dict[str, Any]:
        """Fill every parameter: explicit value > value in ``ctx`` > default.

        Each value is a fresh copy where it is a mutable container (explicit values,
        context values and defaults alike), so a function that edits a parameter
        changes nothing outside this call. Looking a value up here is not recorded
        as a context read: the resolved parameters are part of a cache key already.

        Raises:
            MissingParameterError: a parameter has no explicit value, no context
                value and no default; the message names ``name`` and the parameter.
        """
        resolved = {k: handed_out(v) for k, v in explicit.items()}
        for pname in self.names:
            if pname in resolved:
                continue
            value = ctx.peek(pname, _MISSING)
            if value is not _MISSING:
                resolved[pname] = handed_out(value)
            elif pname in self.defaults:
                resolved[pname] = _fresh_default(self.defaults[pname])
            else:
                raise MissingParameterError(
                    f"{self.kind} {name!r} needs parameter {pname!r}, but it was not given "
                    f"when it was built, is not in the context, and has no default. "
                    f"Pass it explicitly ({name}({pname}=...)), add it to the "
                    f"experiment's initial_ctx or a treatment, or give it a default.",
                    step=name,
                )
        return resolved


def _fresh_default(value: Any) -> Any:
    # A mutable default (def f(data, *, seen=[])) is copied per call, like an explicit
    # value, so one run's edits never leak into the next run's default.
    return copy.deepcopy(value) if isinstance(value, (list, dict, set, bytearray)) else value


def rebuild(factory: Callable[..., Any], explicit: Mapping[str, Any]) -> Any:
    """Rebuild an object from its recipe: ``factory(**explicit)``.

    The ``__reduce__`` of steps, data sources and verifiers returns
    ``(rebuild, (factory, explicit))``, so each travels as its recipe.
    """
    return factory(**explicit)
