"""Connecting to Ray once per driver process; an embedded Ray that outlives each run().

:func:`connect` finds Ray in this order: already initialised in the process (used as
is), ``address``, ``$RAY_ADDRESS``, else ``ray.init()`` without an address, which
joins a Ray started with ``ray start`` on this machine or starts an embedded one.
Whatever crystallize started or connected to stays up for later ``run()`` calls — and
the heavy steps' actor pools with it — until :func:`shutdown`
(``RayExecution.shutdown()``, or leaving ``with RayExecution() as backend:``) or the
interpreter's exit, where Ray's own exit hook shuts it down after the pools are
retired. A Ray initialised by the user is never shut down by crystallize.

``runtime_env`` is a job-level setting: it is given to ``ray.init`` when crystallize
connects. When Ray is already initialised, a ``working_dir`` or ``py_modules`` that the
job does not already have cannot be added any more (Ray refuses them per task), and
:func:`connect` says where to put them; other keys (``env_vars``, ``pip``, ...) then
apply to each task and actor instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from typing import Any

from crystallize.backend import ConfigurationError

from .pools import pools

__all__ = ["JOB_LEVEL_KEYS", "connect", "owns_ray", "shutdown", "task_runtime_env"]

log = logging.getLogger("crystallize_ray")

#: What each worker of a Ray crystallize starts imports as it starts.
PRELOAD = "crystallize_ray._worker"
#: runtime_env keys Ray accepts only for the whole job (``ray.init``), not per task.
JOB_LEVEL_KEYS = ("working_dir", "py_modules", "worker_process_setup_hook")


_LOCK = threading.Lock()
_OWNED = [False]  # whether crystallize called ray.init in this process (and so may shut it down)


def connect(address: str | None, init_kwargs: Mapping[str, Any], runtime_env: Mapping[str, Any] | None) -> bool:
    """Make sure Ray is initialised; return True when this call initialised it.

    Raises:
        ConfigurationError: ``runtime_env`` has job-level keys the running job lacks.
    """
    import ray

    with _LOCK:
        if ray.is_initialized():
            _check_job_env(ray, runtime_env)
            return False
        kwargs = dict(init_kwargs)
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            kwargs["address"] = address
        else:
            # Ray's own default on purpose: join a Ray started with `ray start` on this
            # machine (how a `ray submit` script finds its cluster on the head node),
            # else start an embedded one. Pass init_kwargs={"address": "local"} to
            # always start a fresh one.
            kwargs.setdefault("include_dashboard", False)  # a laptop run needs no web UI
            if "address" not in kwargs and (stale := _dead_default_address()) is not None:
                log.warning(
                    "Ray's address file names a cluster at %s that does not answer (a Ray that "
                    "ended without cleaning up); starting a local Ray instead. Set RAY_ADDRESS or "
                    "RayExecution(address=...) to join a cluster.",
                    stale,
                )
                kwargs["address"] = "local"
        kwargs.setdefault("logging_level", logging.WARNING)
        job_env = {**dict(runtime_env or {}), **dict(kwargs.get("runtime_env") or {})}
        if job_env:
            kwargs["runtime_env"] = job_env
        if "address" in kwargs and kwargs["address"] != "local":
            ray.init(**kwargs)
        else:
            _init_preloading(ray, kwargs)
        _OWNED[0] = True
        return True


def _dead_default_address(probe_seconds: float = 1.0) -> str | None:
    """The address ``ray.init()`` would join by default, when nothing answers there.

    Ray's default joins the cluster named in its address file
    (``/tmp/ray/ray_current_cluster``), which a Ray that died or a test cluster leaves
    behind; joining a dead address hangs for many minutes before it fails. A TCP
    connect within ``probe_seconds`` tells a live cluster from a stale file.
    """
    try:
        from ray._private.utils import read_ray_address  # where Ray keeps the file

        address = read_ray_address(None)
    except Exception:  # another Ray layout: leave the default to Ray
        return None
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=probe_seconds):
            return None
    except (OSError, ValueError):
        return address


def _init_preloading(ray: Any, kwargs: dict[str, Any]) -> None:
    """``ray.init`` that, if it starts a Ray, has each worker import crystallize as it starts.

    A fresh worker (after a crash, under churn) then runs its first task at once
    instead of importing first: the raylet's ``preload_python_modules``. (A runtime
    env ``worker_process_setup_hook`` would do the same, but a job-level runtime env
    slows every worker's start: measured, it made runs under churn 5x slower.) When
    ``ray.init`` joins a running Ray instead, which takes no system config, it is
    called again without.
    """
    given = kwargs.get("_system_config")
    system = dict(given or {})
    preload = list(system.get("preload_python_modules") or [])
    if PRELOAD not in preload:
        system["preload_python_modules"] = [*preload, PRELOAD]
    try:
        ray.init(**{**kwargs, "_system_config": system})
    except ValueError as exc:
        if given or "_system_config" not in str(exc):
            raise
        ray.init(**kwargs)  # joining a running Ray: its workers are its own


def owns_ray() -> bool:
    """Whether crystallize initialised the Ray this process is connected to."""
    import ray

    return _OWNED[0] and ray.is_initialized()


def shutdown() -> None:
    """Retire every actor pool (their ``teardown()`` runs), then shut down a Ray crystallize started.

    A Ray the user initialised is left running (only the pools go). Safe to call
    twice, or when Ray is not initialised.
    """
    import ray

    with _LOCK:
        if ray.is_initialized():
            pools().retire_all()
        pools().forget()
        if _OWNED[0]:
            _OWNED[0] = False
            if ray.is_initialized():
                ray.shutdown()


def stop_on_interrupt() -> None:
    """After Ctrl-C: shut down an embedded Ray crystallize started, pools and all.

    Tasks were cancelled already; a Ray we started goes too, so nothing keeps running
    after the driver gave up (the pools' ``teardown()`` does not run, as with terminated
    process workers). A Ray the user initialised, and its pools, stay for the next run.
    """
    import ray

    with _LOCK:
        if _OWNED[0]:
            _OWNED[0] = False
            pools().forget()
            if ray.is_initialized():
                ray.shutdown()


def task_runtime_env(runtime_env: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What of ``runtime_env`` must still be given per task and actor (None: nothing).

    When crystallize initialised Ray, the whole environment is the job's already.
    Otherwise the keys the job lacks apply per task (:func:`connect` has refused
    job-level ones).
    """
    if not runtime_env:
        return None
    import ray

    if _OWNED[0]:
        return None
    have = _job_env(ray)
    missing = {k: v for k, v in runtime_env.items() if k not in JOB_LEVEL_KEYS and have.get(k) != v}
    return missing or None


def _check_job_env(ray: Any, runtime_env: Mapping[str, Any] | None) -> None:
    if not runtime_env or _OWNED[0]:
        return
    have = _job_env(ray)
    late = [k for k in JOB_LEVEL_KEYS if k in runtime_env and k not in have]  # Ray rewrites paths as URIs
    if late:
        raise ConfigurationError(
            "RayExecution",
            "runtime_env",
            dict(runtime_env),
            f"set before Ray starts: {', '.join(late)} applies to the whole job, and Ray is "
            f"already initialised in this process (Ray refuses it per task). Pass "
            f"runtime_env={{{late[0]!r}: ...}} to your ray.init(...) call, or leave Ray to "
            f"RayExecution (remove the ray.init call) so it starts or joins Ray with it",
        )


def _job_env(ray: Any) -> dict[str, Any]:
    try:
        return dict(ray.get_runtime_context().runtime_env or {})
    except Exception:  # an older Ray without it: assume nothing
        return {}
