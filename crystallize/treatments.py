"""Treatments: named changes to a run's context, each one experimental condition.

A treatment key that nothing reads is a silent no-op (``{"c": 10}`` where the step's
parameter is ``C``), so the experiment asks this module twice whether each key of a
mapping treatment is used: before the runs, by name (:func:`unknown_keys`: no step or
data-source parameter, no ``initial_ctx`` key and no string in the steps' code names
it), and after them, by what the runs did (:func:`unread_keys`: no step read it and
no parameter took it).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from types import CodeType, MappingProxyType
from typing import Any

from .context import _KEYS_READ, FrozenContext

__all__ = ["BASELINE", "Treatment", "treatment", "unknown_keys", "unread_keys"]

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


def treatment(name: str, apply: Mapping[str, Any] | Callable[[FrozenContext], Any] | None = None) -> Any:
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


def unknown_keys(
    treatments: Iterable[Any],
    steps: Sequence[Any],
    datasource: Any,
    initial_ctx: Collection[str],
    plugins: Iterable[Any] = (),
) -> list[str]:
    """One message per mapping-treatment key that nothing is known to read.

    A key is known when a step or data-source parameter is named after it (and was not
    given explicitly when the step was built: an explicit value wins over the context),
    when ``initial_ctx`` sets it, or when the code of a step, the data source or a
    plugin spells it as a string (``ctx.get("lr")``). A key read by a computed name is
    missed, so the messages say what was checked instead of claiming the key is unused.

    Args:
        treatments: the experiment's treatments; callables and non-treatments are skipped.
        steps: the pipeline's steps (anything with ``parameter_names`` and ``params``).
        datasource: the experiment's data source.
        initial_ctx: the keys of the experiment's ``initial_ctx``.
        plugins: the experiment's plugins, whose code may read keys too.

    Example:
        >>> from crystallize import pipeline_step
        >>> @pipeline_step()
        ... def fit(data, *, C=1.0):
        ...     return data
        >>> print(*unknown_keys([Treatment("C=10", {"c": 10.0})], [fit()], None, ()))
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        Treatment 'C=10' sets 'c', but no step or data-source parameter and no
        initial_ctx key is named 'c' (did you mean 'C'?)...
    """
    readers = [*steps, datasource]
    names = {n for r in readers for n in _parameter_names(r)} | {k for k in initial_ctx if isinstance(k, str)}
    spelt: set[str] | None = None  # computed only when needed
    messages = []
    for t in treatments:
        if not isinstance(t, Treatment) or t.mapping is None:
            continue
        for key in t.mapping:
            if key in initial_ctx or any(_injects(r, key) for r in readers):
                continue
            pinned = [_label(r) for r in readers if key in _parameter_names(r)]
            if pinned:
                messages.append(
                    f"Treatment {t.name!r} sets {key!r}, but {', '.join(pinned)} "
                    f"{'was' if len(pinned) == 1 else 'were'} given {key!r} explicitly, and an explicit "
                    f"value wins over the context: the treatment's value never reaches "
                    f"{'it' if len(pinned) == 1 else 'them'}. Drop the explicit {key}=... to let "
                    f"each condition set it."
                )
                continue
            if spelt is None:
                spelt = _spelt_in_code([*readers, *plugins])
            if key not in spelt:
                messages.append(
                    f"Treatment {t.name!r} sets {key!r}, but no step or data-source parameter and no "
                    f"initial_ctx key is named {key!r}{_did_you_mean(key, names)}, and no step, data "
                    f"source or plugin spells {key!r} in its code. Unless one reads it by a computed "
                    f"name, this treatment changes nothing; check the spelling."
                )
    return messages


def unread_keys(
    treatments: Iterable[Any],
    runs: Iterable[Any],
    steps: Sequence[Any],
    datasource: Any,
    plugins: Iterable[Any] = (),
) -> dict[str, list[str]]:
    """Condition -> the keys of its treatment's mapping that none of its runs used.

    A run used a key when a step read it (``StepRecord.reads``; a step that listed the
    context's keys counts as reading all of them) or a step parameter took it from the
    context. The data source's and plugins' reads are not recorded: a key a data-source
    parameter takes, or that their code spells as a string, counts as used. A
    condition none of whose runs finished is left out: its steps may not have reached
    the key.

    Args:
        treatments: the experiment's treatments; only mappings are checked.
        runs: every :class:`~crystallize.RunResult` of the experiment.
        steps: the pipeline's steps, indexed as ``StepRecord.index``.
        datasource: the experiment's data source.
        plugins: the experiment's plugins.
    """
    injectable = [{k for k in _parameter_names(step) if _injects(step, k)} for step in steps]
    used: dict[str, set[str]] = {}
    listed: set[str] = set()  # conditions where a step listed the keys
    finished: set[str] = set()
    for run in runs:
        if run.error is None:
            finished.add(run.condition)
        seen = used.setdefault(run.condition, set())
        for record in run.provenance:
            seen.update(k for k in record.reads if isinstance(k, str))
            if _KEYS_READ in record.reads:
                listed.add(run.condition)
            if 0 <= record.index < len(injectable):
                seen.update(k for k in record.params if k in injectable[record.index])
    untracked = _spelt_in_code([datasource, *plugins])
    unread = {}
    for t in treatments:
        if not isinstance(t, Treatment) or t.mapping is None:
            continue
        if t.name not in finished or t.name in listed:
            continue
        seen = used.get(t.name, set())
        keys = [k for k in t.mapping if k not in seen and k not in untracked and not _injects(datasource, k)]
        if keys:
            unread[t.name] = keys
    return unread


def _parameter_names(reader: Any) -> tuple[str, ...]:
    return tuple(getattr(reader, "parameter_names", ()) or ())


def _injects(reader: Any, key: str) -> bool:
    """Whether ``reader`` (a step or data source) fills parameter ``key`` from the context."""
    return key in _parameter_names(reader) and key not in (getattr(reader, "params", None) or {})


def _label(reader: Any) -> str:
    kind = "data source" if callable(getattr(reader, "fetch", None)) else "step"
    return f"{kind} {getattr(reader, 'name', type(reader).__name__)!r}"


def _spelt_in_code(readers: Iterable[Any]) -> set[str]:
    """Every string constant in the code of these objects: their function (a function
    step's or source's ``fn``, a lambda) or the methods of their own classes."""
    codes: list[CodeType] = []
    for reader in readers:
        fn = getattr(reader, "fn", reader)
        if isinstance(getattr(fn, "__code__", None), CodeType):
            codes.append(fn.__code__)
            continue
        for cls in type(reader).__mro__:
            if cls.__module__.split(".")[0] in ("crystallize", "builtins"):
                continue  # the library's own base classes
            for attr in vars(cls).values():
                attr = getattr(attr, "__func__", getattr(attr, "fget", attr))
                if isinstance(getattr(attr, "__code__", None), CodeType):
                    codes.append(attr.__code__)
    strings: set[str] = set()
    while codes:
        code = codes.pop()
        for const in code.co_consts:
            if isinstance(const, str):
                strings.add(const)
            elif isinstance(const, CodeType):
                codes.append(const)  # nested functions, lambdas, comprehensions
    return strings


def _did_you_mean(key: str, names: Collection[str]) -> str:
    by_folded: dict[str, str] = {}
    for name in sorted(names):
        by_folded.setdefault(name.casefold(), name)
    near = difflib.get_close_matches(key.casefold(), by_folded, n=1, cutoff=0.75)
    return f" (did you mean {by_folded[near[0]]!r}?)" if near else ""
