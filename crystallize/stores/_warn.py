"""One warning per store and problem per process: a cache that fails never floods a log."""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["warn_once"]

log = logging.getLogger("crystallize.cache")

_warned: set[tuple[Any, ...]] = set()
_warned_lock = threading.Lock()


def warn_once(problem: tuple[Any, ...], message: str, *args: Any, level: int = logging.WARNING) -> None:
    """Log ``message`` (at WARNING, or ``level``) the first time ``problem`` is met in this process."""
    with _warned_lock:
        if problem in _warned:
            return
        _warned.add(problem)
    log.log(level, message, *args)
