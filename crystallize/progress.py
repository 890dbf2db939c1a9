"""A dependency-free progress line for long experiments (stderr, throttled)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts finished runs and redraws one status line at most every ``interval`` s.

    Example:
        >>> bar = Progress(3, enabled=False)
        >>> bar.update(failed=False); bar.close()
    """

    def __init__(self, total: int, *, enabled: bool = True, label: str = "crystallize",
                 stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        # A terminal gets one line redrawn in place; a log file (CI, `ray job submit`)
        # gets a whole line every 5 seconds at most.
        self._tty = bool(isatty and isatty())
        self.interval = interval if self._tty else max(interval, 5.0)
        self.done = self.failed = 0
        self._start = self._last = time.monotonic()
        self._first: float | None = None  # when the first run finished
        self._drawn_at = -1

    def update(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        now = time.monotonic()
        if self._first is None:
            self._first = now
        if self.enabled and (now - self._last >= self.interval or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn_at = self.done
        # The rate counts from the first finished run: start-up (a cluster, a pool)
        # would otherwise make the first ETA absurd.
        since_first = now - (self._first or now)
        rate = (self.done - 1) / since_first if self.done > 1 and since_first > 0 else 0.0
        eta = f"ETA {(self.total - self.done) / rate:,.0f}s" if rate else "ETA -"
        pct = 100 * self.done / self.total if self.total else 100
        width = 24
        filled = int(width * pct / 100)
        failed = f", {self.failed} failed" if self.failed else ""
        line = (f"{self.label}: [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"runs ({pct:3.0f}%) {rate:,.1f} runs/s, {eta}{failed}")
        self.stream.write(f"\r{line}  " if self._tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            if self._drawn_at != self.done:
                self._draw(time.monotonic())
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()
