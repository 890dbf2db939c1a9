"""Experiment: a datasource and a pipeline, run over replicates × conditions."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._drive import loop_running
from .backend import ExecutionBackend
from .collector import Collector
from .context import FrozenContext
from .datasource import DataSource
from .errors import (
    PipelineError,
    UnusedTreatmentKeyWarning,
    ValidationError,
)
from .execution import SerialExecution
from .hypotheses import Hypothesis
from .journal import Journal, reusable
from .pipeline import Pipeline
from .plugins import BasePlugin, SeedPlugin, check_plugin
from .result import Result, RunResult
from .runner import RunSpec
from .stores import CacheStore, open_store
from .sysinfo import environment_facts, utc_iso
from .table import treatment_params
from .treatments import BASELINE, Treatment, unknown_keys, unread_keys

__all__ = ["Experiment"]

log = logging.getLogger("crystallize.experiment")

_RESERVED = ("replicate", "condition")


class Experiment:
    """A datasource and a pipeline, run for every replicate of every condition.

    Args:
        datasource: a callable ``f(ctx) -> data`` (a lambda works) or a
            :class:`DataSource`; may be async.
        pipeline: a :class:`Pipeline`, or a list of steps to build one.
        plugins: plugins, including at most one execution backend (default
            :class:`SerialExecution`).
        treatments: the conditions compared against the baseline.
        hypotheses: evaluated on the aggregated metrics after all runs.
        replicates: how many replicates ``run()`` executes by default.
        name: used in logs, artifact folders and task names.
        initial_ctx: the baseline's configuration, added to every run's context;
            a treatment may override these keys for its own condition.
        cache: the store for cacheable steps: a store, a directory, or a URL
            (``"s3://bucket/prefix"``, ``gs://``, ``az://``: see :class:`UrlStore`);
            ``None`` for ``$CRYSTALLIZE_CACHE_URL``, else ``$CRYSTALLIZE_CACHE_DIR``,
            else ``./.cache``; ``False`` for no caching.
        journal: where each finished run is appended as it arrives, so that
            ``run(resume=True)`` after a crash runs only what is missing (see
            :mod:`crystallize.journal`): a directory; ``None`` for
            ``$CRYSTALLIZE_HOME/journals``, else ``./.crystallize/journals``;
            ``False`` for no journal.

    Example:
        >>> from crystallize import pipeline_step
        >>> @pipeline_step()
        ... def total(data, *, scale=1):
        ...     return data, {"total": sum(data) * scale}
        >>> exp = Experiment(datasource=lambda ctx: [1, 2, 3], pipeline=[total()],
        ...                  treatments=[Treatment("double", {"scale": 2})])
        >>> result = exp.run(replicates=2)
        >>> result.metrics.baseline.metrics, result.metrics.treatments["double"].metrics
        ({'total': [6, 6]}, {'total': [12, 12]})
    """

    def __init__(
        self,
        datasource: Callable[[FrozenContext], Any] | DataSource,
        pipeline: Pipeline | Sequence[Any],
        plugins: Sequence[BasePlugin] | None = None,
        *,
        treatments: Sequence[Treatment] | None = None,
        hypotheses: Sequence[Hypothesis] | None = None,
        replicates: int = 1,
        name: str | None = None,
        initial_ctx: Mapping[str, Any] | None = None,
        cache: CacheStore | bool | None = None,
        journal: bool | str | os.PathLike[str] | None = None,
    ) -> None:
        if getattr(datasource, "__crystallize_function__", None) and not isinstance(datasource, DataSource):
            datasource = datasource()  # type: ignore[call-arg]  # a bare @data_source factory
        if not isinstance(pipeline, Pipeline) and isinstance(pipeline, (list, tuple)):
            pipeline = Pipeline(pipeline)
        self.datasource = datasource
        self.pipeline: Pipeline = pipeline  # type: ignore[assignment]  # validate() says if not
        self.plugins = list(plugins or [])
        self.treatments = list(treatments or [])
        self.hypotheses = list(hypotheses or [])
        self.replicates = replicates
        self.name = name or _default_name(datasource)
        self.initial_ctx = dict(initial_ctx or {})
        self.cache = cache
        self.journal = journal

    # -- checks ---------------------------------------------------------------
    def validate(self) -> None:
        """Check the experiment's structure; report every problem at once.

        ``run()`` makes the same checks before any run starts.

        Raises:
            ValidationError: listing each problem with what to do about it.

        Warns:
            UnusedTreatmentKeyWarning: for each treatment key that no step or
                data-source parameter and no ``initial_ctx`` key is named after and
                no step, data source or plugin spells in its code (e.g. ``{"c": 10}``
                where the parameter is ``C``).

        Example:
            >>> from crystallize import pipeline_step
            >>> @pipeline_step()
            ... def fit(data, *, C=1.0):
            ...     return data, {"C": C}
            >>> exp = Experiment(lambda ctx: 0, [fit()], treatments=[Treatment("C=10", {"c": 10.0})])
            >>> import warnings
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     exp.validate()
            >>> print(caught[0].message)  # doctest: +ELLIPSIS
            Treatment 'C=10' sets 'c', but no step ... is named 'c' (did you mean 'C'?)...
        """
        problems = list(self._problems(self.treatments, self.hypotheses, self.replicates))
        if problems:
            raise ValidationError(problems)
        self._warn_unknown_keys(self.treatments, stacklevel=3)

    def _warn_unknown_keys(self, treatments: Sequence[Treatment], stacklevel: int) -> None:
        steps = self.pipeline.steps if isinstance(self.pipeline, Pipeline) else ()
        for message in unknown_keys(treatments, steps, self.datasource, self.initial_ctx, self.plugins):
            warnings.warn(message, UnusedTreatmentKeyWarning, stacklevel=stacklevel)

    def _problems(self, treatments: Sequence[Any], hypotheses: Sequence[Any], replicates: Any) -> list[str]:
        problems = []
        if not callable(self.datasource):
            problems.append(
                f"datasource must be a callable f(ctx) or a DataSource, got {type(self.datasource).__name__}."
            )
        if not isinstance(self.pipeline, Pipeline):
            problems.append(f"pipeline must be a Pipeline, got {type(self.pipeline).__name__}.")
        for plugin in self.plugins:
            problems.extend(check_plugin(plugin))
        backends = [p for p in self.plugins if isinstance(p, ExecutionBackend)]
        if len(backends) > 1:
            names = ", ".join(type(b).__name__ for b in backends)
            problems.append(f"plugins hold {len(backends)} execution backends ({names}); keep one.")
        if not isinstance(replicates, int) or isinstance(replicates, bool) or replicates < 1:
            problems.append(f"replicates must be a positive integer, got {replicates!r}.")
        seen: set[str] = set()
        for t in treatments:
            if not isinstance(t, Treatment):
                problems.append(f"treatments must be Treatment objects, got {t!r}; use Treatment(name, {{...}}).")
                continue
            if t.name == BASELINE:
                problems.append(f"a treatment cannot be named {BASELINE!r}; that name is the untreated condition.")
            if t.name in seen:
                problems.append(f"two treatments are named {t.name!r}; names must be unique.")
            seen.add(t.name)
            if t.mapping is not None:
                bad = [k for k in t.mapping if k in _RESERVED]
                if bad:
                    problems.append(f"treatment {t.name!r} sets reserved key(s) {bad}; they are set per run.")
        hypothesis_names: set[str] = set()
        for h in hypotheses:
            if not isinstance(h, Hypothesis):
                problems.append(f"hypotheses must be Hypothesis objects, got {h!r}; use @hypothesis(...).")
                continue
            if h.name in hypothesis_names:
                problems.append(f"two hypotheses are named {h.name!r}; give each a name=.")
            hypothesis_names.add(h.name)
        if not (self.cache is None or isinstance(self.cache, (bool, str, os.PathLike, CacheStore))):
            problems.append(
                f"cache must be a cache store, a directory path, False (no caching), None "
                f"(the default ./.cache) or a URL such as 's3://bucket/prefix', got {type(self.cache).__name__}: {self.cache!r}."
            )
        bad_keys = [k for k in self.initial_ctx if k in _RESERVED or not isinstance(k, str)]
        if bad_keys:
            problems.append(f"initial_ctx has reserved or non-string key(s) {bad_keys}.")
        return problems

    # -- what runs see --------------------------------------------------------
    @property
    def backend(self) -> ExecutionBackend:
        """The execution backend among the plugins, or a SerialExecution."""
        return next((p for p in self.plugins if isinstance(p, ExecutionBackend)), SerialExecution())

    @property
    def conditions(self) -> list[str]:
        """``"baseline"`` followed by the treatment names."""
        return [BASELINE] + [t.name for t in self.treatments]

    def treatment_for(self, condition: str) -> Treatment | None:
        """The treatment of a condition (``None`` for the baseline)."""
        if condition == BASELINE:
            return None
        for t in self.treatments:
            if t.name == condition:
                return t
        raise KeyError(f"Experiment {self.name!r} has no condition {condition!r}; it has {self.conditions}.")

    def new_context(self, replicate: int, condition: str) -> FrozenContext:
        """A run's fresh context: initial_ctx (overridable by the treatment) + ids."""
        return FrozenContext.for_run(self.initial_ctx, replicate=replicate, condition=condition)

    # -- running --------------------------------------------------------------
    def run(
        self,
        replicates: int | None = None,
        treatments: Sequence[Treatment] | None = None,
        hypotheses: Sequence[Hypothesis] | None = None,
        *,
        resume: bool = False,
        strict: bool = False,
    ) -> Result:
        """Run every replicate of the baseline and each treatment; aggregate.

        A run that fails is recorded in ``result.errors``; the others finish. That
        holds for any exception a step raises, ``sys.exit()`` and other
        ``BaseException`` included; only Ctrl-C stops the experiment.

        Each run is appended to the experiment's journal as it finishes (unless
        ``journal=False``), so a driver that dies, or is stopped, loses at most the
        last half second of results.

        Args:
            replicates: overrides the experiment's ``replicates`` for this call.
            treatments: overrides the experiment's treatments for this call.
            hypotheses: overrides the experiment's hypotheses for this call.
            resume: reuse the successful runs in the journal of this very experiment
                (same steps, data source, treatments, ``initial_ctx``, plugins and
                seed; a drawn seed is reused) and execute only the others. A journal
                of a changed experiment is not used (a warning says what changed).
                Resumed runs do not call ``on_run_result`` again.
            strict: raise :class:`RunsFailedError` (carrying the result) if any run
                failed, once all have finished.

        Returns:
            The :class:`Result`; ``provenance["resumed"]`` counts the runs taken from
            the journal and ``provenance["journal"]`` is its path.

        Raises:
            ValidationError: the experiment is structurally wrong.
            SerializationError: a process/Ray backend cannot ship the experiment.
            RunsFailedError: ``strict=True`` and runs failed.
            KeyboardInterrupt: Ctrl-C. The backend starts no new run and stops its
                workers; ``exc.partial_result`` is a :class:`Result` of every run that
                finished, those that came back while it was stopping included
                (``provenance["complete"]`` is False, no hypotheses are evaluated).
                They are in the journal too: ``run(resume=True)`` continues.

        Example:
            >>> try:                                                  # doctest: +SKIP
            ...     result = exp.run(replicates=1000)
            ... except KeyboardInterrupt as exc:
            ...     result = exc.partial_result
            >>> result = exp.run(replicates=1000, resume=True)        # doctest: +SKIP
        """
        if self.backend.async_native and loop_running():
            raise PipelineError(
                f"Experiment.run() with {type(self.backend).__name__} inside a running event "
                f"loop: use `await experiment.arun(...)`."
            )
        job, plan, journal, resumed = self._prepare(replicates, treatments, hypotheses, resume)
        with Collector(job, plan, journal, resumed) as collector:
            if plan:
                collector.consume(job.backend.execute(job, plan))
        return collector.result(strict)

    async def arun(
        self,
        replicates: int | None = None,
        treatments: Sequence[Treatment] | None = None,
        hypotheses: Sequence[Hypothesis] | None = None,
        *,
        resume: bool = False,
        strict: bool = False,
    ) -> Result:
        """Async form of :meth:`run` (same arguments): use it inside an event loop.

        Cancelling it (``asyncio.run`` does so on Ctrl-C, then raises
        ``KeyboardInterrupt`` itself) stops the backend as Ctrl-C stops :meth:`run`;
        the ``CancelledError`` carries ``partial_result``, and is the
        ``__context__`` of the ``KeyboardInterrupt`` that ``asyncio.run`` raises.
        """
        job, plan, journal, resumed = self._prepare(replicates, treatments, hypotheses, resume)
        with Collector(job, plan, journal, resumed) as collector:
            if plan:
                await collector.aconsume(job.backend.aexecute(job, plan))
        return collector.result(strict)

    def _prepare(
        self,
        replicates: int | None,
        treatments: Sequence[Treatment] | None,
        hypotheses: Sequence[Hypothesis] | None,
        resume: bool = False,
    ) -> tuple[Experiment, list[RunSpec], Journal, list[RunResult]]:
        """This call's experiment, the runs to execute, its journal and the runs it resumes."""
        job = copy.copy(self)  # this call's configuration; self stays reusable
        job.replicates = self.replicates if replicates is None else replicates
        job.treatments = list(self.treatments if treatments is None else treatments)
        job.hypotheses = list(self.hypotheses if hypotheses is None else hypotheses)
        if isinstance(job.cache, (str, os.PathLike)):
            job.cache = open_store(job.cache)  # a directory or a URL such as s3://bucket/prefix
        problems = job._problems(job.treatments, job.hypotheses, job.replicates)
        if job.hypotheses and not job.treatments:
            problems.append("hypotheses compare treatments with the baseline, but there are no treatments.")
        if problems:
            raise ValidationError(problems)
        if not (job.journal is None or isinstance(job.journal, (bool, str, os.PathLike))):
            raise ValidationError(
                [
                    (
                        f"journal must be a directory, None (the default "
                        f"./.crystallize/journals) or False (no journal), got {job.journal!r}."
                    )
                ]
            )
        job._warn_unknown_keys(job.treatments, stacklevel=4)  # user -> run -> _prepare -> here
        journal = Journal.open(job, resume=resume)  # never raises: a journal never costs a run
        try:
            if journal.seed is not None:  # the seed drawn by the run being resumed
                job.plugins = [_pinned(p, journal.seed) for p in job.plugins]
            for plugin in job.plugins:
                plugin.before_run(job)
            conditions = job.conditions
            plan = [RunSpec(r, c) for r in range(job.replicates) for c in conditions]
            journal.start(job)
        except BaseException:
            journal.close()
            raise
        resumed = reusable(journal, plan)
        if resumed:
            log.info(
                "Experiment %r: %d of %d runs resumed from %s; running the other %d.",
                job.name,
                len(resumed),
                len(plan),
                journal.path,
                len(plan) - len(resumed),
            )
        if resumed:
            done = {(run.replicate, run.condition) for run in resumed}
            plan = [spec for spec in plan if (spec.replicate, spec.condition) not in done]
        return job, plan, journal, resumed

    def _finish(self, collected: list[RunResult], started: float, *, evaluate: bool = True) -> Result:
        seed_plugin = next((p for p in self.plugins if hasattr(p, "base_seed")), None)
        ended = time.time()
        provenance = {
            "name": self.name,
            "replicates": self.replicates,
            "conditions": self.conditions,
            "backend": type(self.backend).__name__,
            "seed": getattr(seed_plugin, "base_seed", None),
            "started": utc_iso(started),
            "ended": utc_iso(ended),
            "seconds": ended - started,
            "complete": evaluate,
        }
        # Once per run(), in the driver; each fact is best effort and never costs the result.
        code = [
            *self.pipeline.steps,
            self.datasource,
            *(getattr(h.verifier, "fn", h.verifier) for h in self.hypotheses),
        ]
        provenance.update(environment_facts(code))
        result = Result(
            collected,
            self.conditions,
            provenance=provenance,
            treatment_params=treatment_params(self.treatments, self.initial_ctx, BASELINE),
        )
        if result.errors:
            log.warning(
                "Experiment %r: %d of %d runs failed; the others finished. First: %s. "
                "See result.errors for every failure with its traceback.",
                self.name,
                len(result.errors),
                len(result.runs),
                result.errors[0],
            )
        if evaluate:
            _report_unread_keys(self, result)
            treated = {n: tm.metrics for n, tm in result.metrics.treatments.items()}
            result.metrics.hypotheses = [h.evaluate(result.metrics.baseline.metrics, treated) for h in self.hypotheses]
            for plugin in self.plugins:
                plugin.after_run(self, result)
        return result

    def __repr__(self) -> str:
        return (
            f"Experiment(name={self.name!r}, steps={len(self.pipeline.steps) if isinstance(self.pipeline, Pipeline) else '?'}, "
            f"treatments={[t.name for t in self.treatments]}, replicates={self.replicates})"
        )


def _report_unread_keys(job: Experiment, result: Result) -> None:
    """Record, and log once, the treatment keys that no run of their condition used.

    Sets ``result.provenance["unused_treatment_keys"]`` to ``{condition: [keys]}``
    (empty when every key was used). A diagnostic never costs the result: if it
    fails, that is logged and the result stands.
    """
    try:
        steps = job.pipeline.steps if isinstance(job.pipeline, Pipeline) else ()
        # Only the treatments' own runs can tell (the baseline sets no treatment keys).
        treated = {t.name for t in job.treatments}
        runs = [run for run in result.runs if run.condition in treated] if treated else []
        unread = unread_keys(job.treatments, runs, steps, job.datasource, job.plugins)
    except Exception:
        log.exception(
            "Experiment %r: could not check which treatment keys were used; the result is unaffected.", job.name
        )
        return
    result.provenance["unused_treatment_keys"] = unread
    if unread:
        listed = "; ".join(f"{c!r}: {', '.join(map(repr, keys))}" for c, keys in unread.items())
        log.warning(
            "Experiment %r: no run read these treatment keys, and no step parameter took them "
            "from the context: %s. Unless the data source or a plugin reads them by a computed name, "
            "those treatments changed nothing; check the spelling against the steps' parameters. "
            "(Also in result.provenance['unused_treatment_keys'].)",
            job.name,
            listed,
        )


def _pinned(plugin: BasePlugin, seed: int) -> BasePlugin:
    """A SeedPlugin that draws its seed, pinned to the seed of the run being resumed."""
    if not isinstance(plugin, SeedPlugin) or plugin.seed is not None:
        return plugin
    pinned = copy.copy(plugin)
    pinned.seed = seed
    return pinned


def _default_name(datasource: Any) -> str:
    name = getattr(datasource, "name", None) or getattr(datasource, "__name__", None)
    if not isinstance(name, str) or name == "<lambda>" or not name.isidentifier():
        module = inspect.getmodule(datasource)
        return "experiment" if module is None or module.__name__ == "__main__" else module.__name__.rsplit(".", 1)[-1]
    return name
