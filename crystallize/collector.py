"""The driver's side of one ``run()``: results received as they stream in, in any order.

:class:`Collector` checks each backend's contract (every planned run comes back
exactly once), calls the plugins' ``on_run_result``, queues each run for the
journal, counts progress, and hands what finished to the exception when the backend
fails or Ctrl-C stops it (``exc.partial_result``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from .errors import BackendError
from .journal import Journal
from .plugins import BasePlugin
from .progress import Progress
from .result import Result, RunResult
from .runner import RunSpec

__all__ = ["Collector"]

log = logging.getLogger("crystallize.experiment")


class Collector:
    """Aggregates one run()'s results as they stream in, whatever their order.

    It checks the backend's contract: every planned run comes back exactly once.
    If the backend fails part-way (or is interrupted), the exception carries the
    runs already finished as ``exc.partial_result``, so nothing computed is lost.

    Ctrl-C that strikes while a result is being received (in a plugin hook, say)
    is thrown into the backend's generator at its ``yield``, so the backend stops
    the same way wherever the interrupt landed: it yields the runs that finish
    while it stops its workers, then re-raises.

    Every run received is queued for the journal; runs resumed from the journal
    count as received already (their plugin hooks ran in the driver that did them).
    """

    def __init__(
        self, job: Any, plan: Sequence[RunSpec], journal: Journal | None = None, resumed: Sequence[RunResult] = ()
    ) -> None:
        self.job = job
        self.journal = journal or Journal()
        self.resumed = len(resumed)
        self.runs: list[RunResult] = list(resumed)
        self.seen: set[tuple[int, str]] = {(run.replicate, run.condition) for run in resumed}
        self.expected = {(spec.replicate, spec.condition) for spec in plan} | self.seen
        self.progress = Progress(len(plan), enabled=job.backend.progress, label=f"crystallize {job.name}")
        self.started = time.time()
        # Looked up once: most plugins leave on_run_result alone, and most runs show no progress.
        self._listeners = [p for p in job.plugins if _overrides(p, "on_run_result")]
        self._count = self.progress.update if self.progress.enabled else None

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self.progress.close()
        self.journal.close()  # what arrived is written, whatever happened
        if exc is None:
            missing = self.expected - self.seen
            if missing:
                exc = BackendError(
                    f"{type(self.job.backend).__name__} returned {len(self.seen) - self.resumed} of "
                    f"{len(self.expected) - self.resumed} planned runs; missing: {_runs(missing)}. This is a "
                    f"bug in the backend; the finished runs are in exc.partial_result."
                )
                exc.partial_result = self._finish(evaluate=False)  # type: ignore[attr-defined]
                raise exc
        elif not hasattr(exc, "partial_result"):
            try:
                exc.partial_result = self._finish(evaluate=False)  # type: ignore[attr-defined]
            except Exception:  # never mask the original error
                log.exception("Could not aggregate the finished runs after %r", exc)

    def _finish(self, *, evaluate: bool = True) -> Result:
        result = self.job._finish(self.runs, self.started, evaluate=evaluate)
        result.provenance["resumed"] = self.resumed
        result.provenance["journal"] = None if self.journal.path is None else str(self.journal.path)
        return result

    def consume(self, runs: Any) -> None:
        """Receive every run that ``runs`` (what ``backend.execute`` returned) yields.

        See the class docstring for Ctrl-C.
        """
        run = None
        try:
            for run in runs:
                self.receive(run)
                run = None
        except KeyboardInterrupt as exc:
            self._keep(run)
            throw = getattr(runs, "throw", None)
            if throw is not None:
                try:  # a generator that raised the interrupt itself re-raises it here
                    run = throw(exc)
                    while True:
                        self.receive(run)
                        run = next(runs)
                except StopIteration:
                    pass
                except KeyboardInterrupt as again:
                    if again is not exc:  # a second Ctrl-C: stop receiving now
                        raise
            raise
        finally:
            close = getattr(runs, "close", None)
            if close is not None:
                close()

    async def aconsume(self, runs: Any) -> None:
        """Receive every run of ``runs`` (what ``backend.aexecute`` returned), as :meth:`consume`."""
        run = None
        try:
            async for run in runs:
                self.receive(run)
                run = None
        except KeyboardInterrupt as exc:
            self._keep(run)
            athrow = getattr(runs, "athrow", None)
            if athrow is not None:
                try:  # an exhausted async generator returns None here
                    run = await athrow(exc)
                    while run is not None:
                        self.receive(run)
                        run = await runs.__anext__()
                except StopAsyncIteration:
                    pass
                except KeyboardInterrupt as again:
                    if again is not exc:
                        raise
            raise
        finally:
            aclose = getattr(runs, "aclose", None)
            if aclose is not None:
                await aclose()

    def _keep(self, run: RunResult | None) -> None:
        """Keep the run that Ctrl-C interrupted the receiving of, if it was planned."""
        if run is not None:
            key = (run.replicate, run.condition)
            if key in self.expected and key not in self.seen:
                self.seen.add(key)
                self.runs.append(run)
                self.journal.append(run)

    def receive(self, run: RunResult) -> None:
        key = (run.replicate, run.condition)
        seen = self.seen
        if key in seen or key not in self.expected:
            what = "twice" if key in seen else "although it was not planned"
            raise BackendError(
                f"{type(self.job.backend).__name__} returned replicate {run.replicate}, "
                f"condition {run.condition!r} {what}. This is a bug in the backend; the runs "
                f"finished so far are in exc.partial_result."
            )
        seen.add(key)
        self.runs.append(run)
        for plugin in self._listeners:
            try:
                plugin.on_run_result(self.job, run)
            except Exception:
                log.exception(
                    "Plugin %s.on_run_result failed for replicate %d, condition %r; the run's result is kept.",
                    type(plugin).__name__,
                    run.replicate,
                    run.condition,
                )
        self.journal.append(run)
        if self._count is not None:
            self._count(failed=run.error is not None)

    def result(self, strict: bool = False) -> Result:
        result = self._finish()
        return result.raise_for_errors() if strict else result


def _overrides(plugin: Any, hook: str) -> bool:
    """Whether ``plugin`` does something in ``hook`` (BasePlugin's own does nothing)."""
    method = getattr(plugin, hook, None)
    return getattr(method, "__func__", method) is not getattr(BasePlugin, hook)


def _runs(keys: set[tuple[int, str]], most: int = 5) -> str:
    shown = ", ".join(f"(replicate {r}, {c!r})" for r, c in sorted(keys)[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")
