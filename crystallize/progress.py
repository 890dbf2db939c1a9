"""Progress over an experiment's runs: a redrawn line on a terminal, log lines elsewhere.

On a terminal, one status line (a bar, runs done, rate, ETA) is redrawn in place at
most every ``interval`` seconds. When the stream is not a terminal (a CI log,
``ray job submit``, a batch system's output file), whole timestamped lines are
written to the stream instead, every ``every`` seconds (default 10, or
``$CRYSTALLIZE_PROGRESS_EVERY``) -- also while no run finishes, so a log shows the
job is alive -- plus a first line when the runs start and a final line when they
stop, whatever the reason::

    2025-05-01T09:30:00Z crystallize grid: started, 120 runs planned
    2025-05-01T09:30:10Z crystallize grid: [######..................] 31/120 runs ( 26%), 1 failed, 3.1 runs/s, ETA 29s
    2025-05-01T09:30:48Z crystallize grid: [########################] 120/120 runs (100%), 1 failed, finished in 48.2s (2.5 runs/s)

The lines go to the stream (stderr by default), not through ``logging``, so they
appear without any logging set-up. A progress line that cannot be written never
costs a run: the first failure is logged and the progress goes quiet.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

__all__ = ["DEFAULT_EVERY", "Progress"]

log = logging.getLogger("crystallize.progress")

#: Seconds between log lines when the stream is not a terminal.
DEFAULT_EVERY = 10.0
_ENV = "CRYSTALLIZE_PROGRESS_EVERY"


class Progress:
    """Counts finished runs and reports them on ``stream``.

    Args:
        total: how many runs are planned.
        enabled: ``False`` writes nothing.
        label: starts every line, e.g. ``"crystallize grid"``.
        stream: where to write (default ``sys.stderr``).
        interval: the fastest redraw on a terminal, in seconds.
        every: seconds between log lines when ``stream`` is not a terminal;
            ``None`` reads ``$CRYSTALLIZE_PROGRESS_EVERY``, else 10. ``0`` writes a
            line per finished run.

    Example:
        >>> import io
        >>> log_file = io.StringIO()
        >>> bar = Progress(2, label="demo", stream=log_file, every=3600)
        >>> bar.update(); bar.update(failed=True); bar.close()
        >>> print(log_file.getvalue().splitlines()[-1].split(" ", 1)[1])  # doctest: +ELLIPSIS
        demo: [########################] 2/2 runs (100%), 1 failed, finished in 0.0s (... runs/s)
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        label: str = "crystallize",
        stream: TextIO | None = None,
        interval: float = 0.2,
        every: float | None = None,
    ) -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        try:
            self._tty = bool(isatty and isatty())
        except (OSError, ValueError):  # a closed stream
            self._tty = False
        self.interval = interval
        self.every = _every_from_env() if every is None else max(0.0, float(every))
        self.done = self.failed = 0
        self._start = self._last = time.monotonic()
        self._first: float | None = None  # when the first run finished
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if self.enabled and not self._tty:
            self._write(f"{self.label}: started, {self.total} runs planned")
            if self.every > 0:
                self._beat = threading.Thread(target=self._heartbeat, name="crystallize-progress", daemon=True)
                self._beat.start()

    def update(self, *, failed: bool = False) -> None:
        """Count one finished run (``failed=True`` if it failed); maybe write a line."""
        with self._lock:
            self.done += 1
            self.failed += int(failed)
            now = time.monotonic()
            if self._first is None:
                self._first = now
            if not self.enabled or self._closed:
                return
            if self._tty:
                if now - self._last >= self.interval or self.done == self.total:
                    self._redraw(now)
            elif now - self._last >= self.every:
                self._log_line(now)

    def close(self) -> None:
        """Write the final state (always, when enabled) and stop; closing twice is harmless."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with self._lock:
            if not self.enabled or self._closed:
                return
            self._closed = True
            now = time.monotonic()
            if self._tty:
                self._redraw(now, final=True)
                self._emit("\n")
            else:
                self._write(f"{self.label}: {self._status(now, final=True)}")

    # -- lines ----------------------------------------------------------------------
    def _status(self, now: float, final: bool = False) -> str:
        """``[bar] done/total runs (pct), failed``, then the rate and ETA, or how it ended."""
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        pct = 100 * self.done / self.total if self.total else 100
        head = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} runs ({pct:3.0f}%), "
            f"{self.failed} failed"
        )
        if final:
            took = now - self._start
            verb = "finished in" if self.done >= self.total else "stopped after"
            rate = f"{self.done / took:,.1f}" if took > 0 else "-"
            return f"{head}, {verb} {took:,.1f}s ({rate} runs/s)"
        # The rate counts from the first finished run: start-up (a cluster, a pool)
        # would otherwise make the first ETA absurd.
        since_first = now - (self._first or now)
        rate_now = (self.done - 1) / since_first if self.done > 1 and since_first > 0 else 0.0
        eta = f"ETA {(self.total - self.done) / rate_now:,.0f}s" if rate_now else "ETA -"
        return f"{head}, {rate_now:,.1f} runs/s, {eta}"

    def _redraw(self, now: float, final: bool = False) -> None:
        self._last = now
        self._emit(f"\r{self.label}: {self._status(now, final)}\x1b[K")

    def _log_line(self, now: float) -> None:
        self._last = now
        self._write(f"{self.label}: {self._status(now)}")

    def _write(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._emit(f"{stamp} {line}\n")

    def _emit(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # a closed or broken stream must not cost a run
            self.enabled = False
            self._stop.set()
            log.warning(
                "The progress line could not be written (%s: %s); progress is off for the "
                "rest of this run. The runs are unaffected.",
                type(exc).__name__,
                exc,
            )

    def _heartbeat(self) -> None:
        """Write a line whenever ``every`` seconds pass without one, runs finishing or not."""
        wait = self.every
        while not self._stop.wait(wait):
            with self._lock:
                now = time.monotonic()
                if not self.enabled or self._closed:
                    return
                if now - self._last >= self.every:
                    self._log_line(now)
                wait = max(self.every - (now - self._last), 0.01)


def _every_from_env() -> float:
    raw = os.environ.get(_ENV)
    if not raw:
        return DEFAULT_EVERY
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # negative, or NaN
        log.warning("%s=%r is not a number of seconds >= 0; using %s.", _ENV, raw, DEFAULT_EVERY)
        return DEFAULT_EVERY
    return value
