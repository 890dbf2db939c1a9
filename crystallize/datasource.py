"""Data sources: where each run's input data comes from."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .context import FrozenContext
from .params import Signature, rebuild

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

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The keyword parameters filled from the context; empty unless built by ``@data_source``."""
        return ()


class _FunctionSource(DataSource):
    """A data source built by a ``@data_source`` factory: the function plus explicit params."""

    def __init__(
        self, factory: Callable[..., Any], fn: Callable[..., Any], signature: Signature, params: dict[str, Any]
    ) -> None:
        self._factory, self.fn, self._signature = factory, fn, signature
        self.params = dict(params)

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self._signature.names)

    def fetch(self, ctx: FrozenContext) -> Any:
        return self.fn(ctx, **self._signature.resolve(self.name, self.params, ctx))

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (self._factory, self.params))


def data_source(fn: Callable[..., Any]) -> Callable[..., DataSource]:
    """Turn ``fn(ctx, *, params...)`` into a factory of :class:`DataSource` objects.

    Parameters are filled like step parameters: explicit > context > default, and
    each value is the function's own copy.

    Raises:
        UnknownParameterError: (a ``TypeError``) when the factory is given a name the
            function does not take (unless it takes ``**kwargs``).

    Example:
        >>> @data_source
        ... def numbers(ctx, n=3):
        ...     return list(range(n))
        >>> numbers(n=2)(FrozenContext())
        [0, 1]
    """
    signature = Signature(fn, first="ctx", kind="Data source")

    @functools.wraps(fn)
    def factory(**params: Any) -> DataSource:
        signature.check_explicit(fn.__name__, params)
        return _FunctionSource(factory, fn, signature, params)

    factory.__crystallize_function__ = fn  # type: ignore[attr-defined]
    return factory
