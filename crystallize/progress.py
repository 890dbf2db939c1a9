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
        self.interval = interval
        self.done = self.failed = 0
        self._start = self._last = time.monotonic()
        self._drawn_at = -1

    def update(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn_at = self.done
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else float("inf")
        pct = 100 * self.done / self.total if self.total else 100
        width = 24
        filled = int(width * pct / 100)
        failed = f", {self.failed} failed" if self.failed else ""
        self.stream.write(
            f"\r{self.label}: [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"runs ({pct:3.0f}%) {rate:,.1f} runs/s, ETA {eta:,.0f}s{failed}  "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            if self._drawn_at != self.done:
                self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
