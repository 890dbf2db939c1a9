"""Data sources: where each run's input data comes from."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .context import _MISSING, FrozenContext
from .errors import MissingParameterError, UnknownParameterError

__all__ = ["DataSource", "data_source"]


class DataSource:
    """Base class for data sources: override ``fetch(ctx)``.

    Any callable ``f(ctx)`` also works as an experiment's datasource; subclass this
    when a source holds configuration or resources. ``fetch`` may be async.

    Example:
        >>> class Numbers(DataSource):
        ...     def fetch(self, ctx):
        ...         return [1, 2, 3]
        >>> Numbers()(FrozenContext())
        [1, 2, 3]
    """

    def fetch(self, ctx: FrozenContext) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define fetch(self, ctx).")

    def __call__(self, ctx: FrozenContext) -> Any:
        return self.fetch(ctx)

    @property
    def name(self) -> str:
        return type(self).__name__


class _FunctionSource(DataSource):
    def __init__(self, factory: Callable[..., Any], fn: Callable[..., Any], params: dict[str, Any]) -> None:
        self._factory, self.fn, self.params = factory, fn, dict(params)
        signature = inspect.signature(fn)
        self._names = [p for p in list(signature.parameters)[1:]]
        self._defaults = {
            p.name: p.default for p in signature.parameters.values()
            if p.default is not inspect.Parameter.empty
        }

    @property
    def name(self) -> str:
        return self.fn.__name__

    def fetch(self, ctx: FrozenContext) -> Any:
        kwargs = dict(self.params)
        for pname in self._names:
            if pname in kwargs:
                continue
            value = ctx._peek(pname)
            if value is not _MISSING:
                kwargs[pname] = value
            elif pname in self._defaults:
                kwargs[pname] = self._defaults[pname]
            else:
                raise MissingParameterError(
                    f"Data source {self.name!r} needs parameter {pname!r}: pass it "
                    f"({self.name}({pname}=...)), put it in initial_ctx, or give it a default."
                )
        return self.fn(ctx, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._factory, self.params))


def _rebuild(factory: Callable[..., Any], params: dict[str, Any]) -> DataSource:
    return factory(**params)


def data_source(fn: Callable[..., Any]) -> Callable[..., DataSource]:
    """Turn ``fn(ctx, *, params...)`` into a factory of :class:`DataSource` objects.

    Parameters are filled like step parameters: explicit > context > default.

    Example:
        >>> @data_source
        ... def numbers(ctx, n=3):
        ...     return list(range(n))
        >>> numbers(n=2)(FrozenContext())
        [0, 1]
    """
    valid = [p for p in list(inspect.signature(fn).parameters)[1:]]

    @functools.wraps(fn)
    def factory(**params: Any) -> DataSource:
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise UnknownParameterError(
                f"Data source {fn.__name__!r} got unknown parameter(s) "
                f"{', '.join(map(repr, unknown))}; its parameters are: {', '.join(valid) or '(none)'}."
            )
        return _FunctionSource(factory, fn, params)

    factory.__crystallize_function__ = fn  # type: ignore[attr-defined]
    return factory
