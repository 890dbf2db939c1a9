"""Limit the native thread pools (BLAS, OpenMP) of a worker process to its CPU share.

A process pool of N workers on N cores, each running numpy with N BLAS threads, runs
N² threads on N cores: on scikit-learn work that made the pool several times slower
than one process. Pool workers call :func:`limit_native_threads` first thing, like
joblib's loky workers do.
"""

from __future__ import annotations

import logging
import os

__all__ = ["limit_native_threads"]

log = logging.getLogger("crystallize.parallel")

# Read by BLAS/OpenMP libraries that this process loads from now on.
_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
_LIMITERS: list[object] = []  # keeps the active limit alive for the process


def limit_native_threads(threads: int) -> None:
    """Let native thread pools of this process use at most ``threads`` threads.

    Libraries already loaded (a forked worker inherits numpy's BLAS from the
    driver) are limited through ``threadpoolctl``; libraries loaded later read the
    environment variables set here. Never raises: a limit that cannot be applied
    only costs speed, so it is logged at debug level.

    Example:
        >>> limit_native_threads(1)     # doctest: +SKIP
    """
    for name in _ENV_VARS:
        os.environ[name] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency, but never worth a run
        return
    try:
        _LIMITERS.append(threadpool_limits(limits=threads))
    except Exception as exc:  # an exotic BLAS build must not cost a worker
        log.debug("Could not limit native threads to %d: %s", threads, exc)
