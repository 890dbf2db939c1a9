"""Pipeline steps: the ``PipelineStep`` base class and the ``@pipeline_step`` decorator.

A step is a callable ``step(data, ctx) -> data``. Function steps declare their
configuration as keyword parameters; each one is filled, in this order of
precedence, from the value given when the step was built, the run's context, or the
function's default.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .context import FrozenContext
from .fingerprint import code_fingerprint
from .hashing import UnhashableValueError, hash_struct, hash_value
from .params import Signature, rebuild

__all__ = ["PipelineStep", "pipeline_step", "step_key"]

log = logging.getLogger("crystallize.cache")


class PipelineStep:
    """Base class for steps; subclass it for steps that hold heavy resources.

    Override ``__call__(data, ctx)``; optionally ``params`` (configuration shown in
    provenance and part of its cache key), ``setup(ctx)`` and ``teardown(ctx)``. The
    constructor arguments are part of the cache key too (``Scale(3)`` never reuses
    ``Scale(2)``'s outputs), so they must be hashable for the step to be cached. Set
    the class attribute ``cacheable = True`` when outputs may be reused,
    ``version = "..."`` to key the cache on a label instead of the code, and
    ``heavy = True`` to ship the step as its recipe (class + constructor arguments)
    instead of pickling the loaded resource: process workers build their own
    instance, once per worker; under ``RayExecution`` the step becomes a pool of Ray
    actors, each building it and calling ``setup()`` once, and the runs send their
    calls there. The class attributes ``pool_size``, ``num_cpus``, ``num_gpus`` and
    ``resources`` size that pool (see ``crystallize_ray.pools``); load the model in
    ``setup()``, not ``__init__``, so the driver never loads it.

    Example:
        >>> class AddOne(PipelineStep):
        ...     def __call__(self, data, ctx):
        ...         return data + 1
        >>> AddOne()(1, FrozenContext())
        2
    """

    cacheable: bool = False
    heavy: bool = False
    version: str | None = None
    #: A heavy step's actor pool under RayExecution: how many actors (``None``: as many
    #: as the cluster's resources allow, at most one per run), and what each one holds.
    #: ``RayExecution(heavy={"ClassName": {...}})`` overrides them per backend.
    pool_size: int | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    resources: Mapping[str, float] | None = None

    # Whether the constructor arguments are this class's recipe (part of its identity).
    _records_recipe: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> PipelineStep:
        self = super().__new__(cls)
        if cls._records_recipe:
            # The constructor arguments identify the instance in cache keys (Scale(3)
            # is not Scale(2)), and a heavy step travels as them: it is rebuilt, once,
            # in each worker process that loads the experiment.
            self.__dict__["_crystallize_recipe"] = (args, kwargs)
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        recipe = self.__dict__.get("_crystallize_recipe")
        if self.heavy and isinstance(recipe, tuple):
            return (_rebuild_heavy, (type(self), recipe[0], recipe[1]))
        return super().__reduce_ex__(protocol)

    def __call__(self, data: Any, ctx: FrozenContext) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(self, data, ctx).")

    @property
    def params(self) -> Mapping[str, Any]:
        """The configuration that identifies this step instance (for cache keys)."""
        return {}

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The keyword parameters the step declares, filled explicit > context > default.

        Empty for class steps: they read the context themselves (``ctx.get``).
        """
        return ()

    @property
    def name(self) -> str:
        """A readable name for messages and provenance."""
        return type(self).__name__

    def setup(self, ctx: FrozenContext) -> None:
        """Called once per experiment run, where the step lives, before any replicate."""

    def teardown(self, ctx: FrozenContext) -> None:
        """Called once per experiment run, where the step lives, after the last replicate."""

    # -- what the pipeline asks of every step ---------------------------------
    def resolve_params(self, ctx: FrozenContext) -> dict[str, Any]:
        """The parameters this step runs with in ``ctx`` (for classes: ``params``)."""
        return dict(self.params)

    def cache_identity(self) -> tuple[str, str]:
        """``(identity, code)`` for the cache key, remembered until :meth:`forget_cache_identity`.

        The identity is the qualified name of the class (or function) plus, for a
        class step, the digest of its constructor arguments; the code is its
        fingerprint, or ``version:<label>`` when ``version`` is set.

        Raises:
            UnhashableValueError: a constructor argument cannot be hashed (warned
                about once); the step then runs without the cache.
        """
        memo = self.__dict__.get("_crystallize_identity")
        if memo is None:
            memo = self._identity()
            self.__dict__["_crystallize_identity"] = memo
        if isinstance(memo, UnhashableValueError):
            # A fresh exception each time: re-raising one would grow its traceback.
            raise UnhashableValueError(memo.value_type, memo.reason)
        return memo

    def forget_cache_identity(self) -> None:
        """Read the code fingerprint and constructor arguments again at the next key.

        :meth:`cache_identity` remembers them; ``Pipeline.run()``, ``Pipeline.arun()``
        and every ``Experiment.run()`` call this first, so a module constant rebound
        (or a module-level list changed) between two runs in one process is seen.
        """
        self.__dict__.pop("_crystallize_identity", None)

    def qualified_name(self) -> str:
        """``module.qualname`` of the step's class (or, for function steps, function)."""
        target = self._code_target()
        return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', self.name)}"

    def _identity(self) -> tuple[str, str] | UnhashableValueError:
        identity = self.qualified_name()
        recipe = self._recipe_digest()
        if isinstance(recipe, UnhashableValueError):
            return recipe
        if recipe is not None:
            identity = f"{identity}({recipe})"
        if self.version is not None:
            return identity, f"version:{self.version}"
        return identity, code_fingerprint(self._code_target())

    def _recipe_digest(self) -> str | UnhashableValueError | None:
        """The digest of the constructor arguments; ``None`` for function steps."""
        recipe = self.__dict__.get("_crystallize_recipe")
        if recipe is None:
            return None
        if isinstance(recipe, _ShippedRecipe):
            return (
                recipe.digest
                if recipe.digest is not None
                else UnhashableValueError(recipe.problem or "?", "its constructor arguments could not be hashed")
            )
        try:
            return hash_value(_bound(type(self), *recipe))
        except UnhashableValueError as exc:
            _warn_unkeyable(self, exc)
            return exc

    @property
    def step_hash(self) -> str:
        """Digest of this step's identity, code and explicit parameters.

        It names the step's folder in the cache (``.cache/<step_hash>/...``) when no
        parameter is injected from the context; injected values are part of each
        entry's key instead.
        """
        identity, code = self.cache_identity()
        explicit = {name: hash_value(value) for name, value in dict(self.params).items()}
        return step_key(identity, code, explicit, {})

    def is_async(self) -> bool:
        """Whether calling the step returns an awaitable."""
        return inspect.iscoroutinefunction(type(self).__call__)

    def _code_target(self) -> Any:
        return type(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_crystallize_identity", None)
        if "_crystallize_recipe" in state:
            # The recipe travels as its digest: what identifies the step, without
            # pickling constructor arguments the instance may not even keep.
            state["_crystallize_recipe"] = _ShippedRecipe.of(self)
        return state

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in dict(self.params).items())
        return f"{self.name}({params})"


def step_key(identity: str, code: str, explicit: Mapping[str, str], injected: Mapping[str, str]) -> str:
    """The step part of a cache key, from the digests of each parameter.

    Args:
        identity: the step's qualified name and constructor-argument digest.
        code: its code fingerprint (or ``version:<label>``).
        explicit: explicit parameter name -> digest of its value.
        injected: injected parameter name -> digest of its value.

    Example:
        >>> step_key("m.f", "code", {"k": "d1"}, {}) != step_key("m.f", "code", {}, {"k": "d1"})
        True
    """
    return hash_struct("step", identity, code, dict(explicit), dict(injected))


def _rebuild_heavy(cls: type[PipelineStep], args: tuple[Any, ...], kwargs: dict[str, Any]) -> PipelineStep:
    return cls(*args, **kwargs)


def _bound(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The constructor arguments by parameter name, defaults filled in.

    ``Scale(3)``, ``Scale(factor=3)`` and ``Scale(3, shift=0)`` are one recipe.
    """
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)  # type: ignore[misc]
    except (TypeError, ValueError):  # no introspectable signature: as given
        return (args, kwargs)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])  # without self


class _ShippedRecipe:
    """A class step's constructor arguments as they travel: their digest, or why none."""

    __slots__ = ("digest", "problem")

    def __init__(self, digest: str | None, problem: str | None) -> None:
        self.digest, self.problem = digest, problem

    @classmethod
    def of(cls, step: PipelineStep) -> _ShippedRecipe:
        found = step._recipe_digest()
        if isinstance(found, UnhashableValueError):
            return cls(None, found.value_type)
        return cls(found, None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ShippedRecipe, (self.digest, self.problem))


_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def _warn_unkeyable(step: PipelineStep, exc: UnhashableValueError) -> None:
    """Warn once per process and step class that its arguments cannot be keyed."""
    key = (step.qualified_name(), exc.value_type)
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    log.warning(
        "Step %r is cacheable, but its constructor arguments cannot be hashed (a value of "
        "type %r: %s); it runs without the cache. Pass plain data (a path, a config) to "
        "the constructor and load the object in setup(), or give that type a __getstate__.",
        step.name,
        exc.value_type,
        exc.reason,
    )


class FunctionStep(PipelineStep):
    """A step built by a ``@pipeline_step`` factory: the function plus explicit params."""

    _records_recipe = False  # identified by its function and explicit params

    def __init__(
        self,
        factory: Callable[..., FunctionStep],
        fn: Callable[..., Any],
        signature: Signature,
        explicit: dict[str, Any],
        cacheable: bool,
        version: str | None,
    ) -> None:
        self._factory = factory
        self.fn = fn
        self._signature = signature
        self._explicit = dict(explicit)
        self.cacheable = cacheable
        self.version = version

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def params(self) -> Mapping[str, Any]:
        """The parameters given explicitly when the step was built."""
        return dict(self._explicit)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The function's keyword parameters (never ``ctx``, ``*args`` or ``**kwargs``)."""
        return tuple(self._signature.names)

    def resolve_params(self, ctx: FrozenContext) -> dict[str, Any]:
        """Fill every parameter: explicit value > value in ``ctx`` > default.

        Raises:
            MissingParameterError: a parameter has no explicit value, no ctx value and
                no default.
        """
        return self._signature.resolve(self.name, self._explicit, ctx)

    def __call__(self, data: Any, ctx: FrozenContext) -> Any:
        return self.call_resolved(data, ctx, self.resolve_params(ctx))

    def call_resolved(self, data: Any, ctx: FrozenContext, params: dict[str, Any]) -> Any:
        """Call the function with parameters already filled by :meth:`resolve_params`."""
        if self._signature.wants_ctx:
            return self.fn(data, ctx=ctx, **params)
        return self.fn(data, **params)

    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def _code_target(self) -> Any:
        return self.fn

    def __reduce__(self) -> tuple[Any, ...]:
        # Ship the recipe (factory + explicit params), never the wrapped function by
        # name: the module attribute with the function's name is the factory.
        return (rebuild, (self._factory, self._explicit))


def pipeline_step(fn: Callable[..., Any] | None = None, *, cacheable: bool = False, version: str | None = None) -> Any:
    """Turn a function ``fn(data, ctx, *, params...)`` into a step factory.

    Calling the factory with keyword parameters returns a :class:`PipelineStep`.
    ``ctx`` is optional in the signature; async functions are awaited.

    Args:
        cacheable: store outputs in the step cache and reuse them when the code,
            parameters (explicit and injected), context values read and input match.
        version: a label that replaces the code fingerprint in the cache key.

    Raises:
        UnknownParameterError: (a ``TypeError``) when the factory is given a name the
            function does not take.

    Example:
        >>> @pipeline_step()
        ... def scale(data, *, factor=1.0):
        ...     return [x * factor for x in data]
        >>> scale(factor=2.0)([1, 2], FrozenContext())
        [2.0, 4.0]
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., FunctionStep]:
        signature = Signature(func, first="data", kind="Step")

        @functools.wraps(func)
        def factory(**params: Any) -> FunctionStep:
            signature.check_explicit(func.__name__, params)
            return FunctionStep(factory, func, signature, params, cacheable, version)

        factory.__crystallize_function__ = func  # type: ignore[attr-defined]
        factory.__crystallize_factory__ = True  # type: ignore[attr-defined]
        return factory

    if fn is not None:
        if not callable(fn):
            raise TypeError("pipeline_step takes keyword options only: @pipeline_step(cacheable=True).")
        return decorate(fn)
    return decorate


def is_step_factory(obj: Any) -> bool:
    """Whether ``obj`` is a ``@pipeline_step`` factory or a ``functools.partial`` of one."""
    if isinstance(obj, functools.partial):
        return is_step_factory(obj.func)
    return bool(getattr(obj, "__crystallize_factory__", False))
