"""Where a result came from: host, versions, the user's packages and the git commit.

:func:`environment_facts` is called once per ``Experiment.run()`` in the driver and
its facts go into ``result.provenance``. Every fact is best effort: a missing ``git``,
a source file outside any git tree or a slow ``git status`` leaves that fact out and
never costs a run. Nothing here imports Ray or numpy; versions are read from the
installed distributions' metadata.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import types
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["environment_facts", "git_facts", "source_file", "utc_iso"]

log = logging.getLogger("crystallize.sysinfo")

#: How long ``git`` may take per call before the fact is left out.
GIT_TIMEOUT = 2.0
#: How long a directory's git facts are reused within one process.
GIT_CACHE_SECONDS = 5.0

_git_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
_git_lock = threading.Lock()
_NOT_USER = {"builtins", "__main__", "crystallize", "crystallize_ray"}


def utc_iso(timestamp: float) -> str:
    """A ``time.time()`` value as ISO 8601 in UTC, to the millisecond.

    Example:
        >>> utc_iso(0)
        '1970-01-01T00:00:00.000Z'
    """
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def environment_facts(sources: Iterable[Any]) -> dict[str, Any]:
    """The host, platform, versions, user packages and git state behind ``sources``.

    Args:
        sources: the experiment's code in order of preference for the git lookup:
            its steps, then its data source, then anything else whose imports count
            (e.g. verifier functions). Instances stand for their class; function
            steps and sources for their function.

    Returns:
        ``{"host", "platform", "versions": {"python", "crystallize", "numpy"?, "ray"?},
        "packages": {distribution: version}, "git"?: {"commit", "dirty", "root"}}``;
        a fact that cannot be found is left out.

    Example:
        >>> facts = environment_facts([utc_iso])
        >>> "python" in facts["versions"], "host" in facts
        (True, True)
    """
    targets = []
    for source in sources:
        try:
            targets.append(_code_target(source))
        except Exception:  # noqa: BLE001, S112 -- an odd object only loses its own facts
            continue
    facts: dict[str, Any] = {}
    for name, get in (
        ("host", socket.gethostname),
        ("platform", platform.platform),
        ("versions", _versions),
        ("packages", lambda: _user_packages(targets)),
        ("git", lambda: _first_git(targets)),
    ):
        try:
            value = get()
        except Exception as exc:  # noqa: BLE001 -- a provenance fact never costs a run
            log.warning(
                "Could not determine %s for result.provenance (%s: %s); it is left out.", name, type(exc).__name__, exc
            )
            continue
        if value is not None:
            facts[name] = value
    return facts


def source_file(obj: Any) -> Path | None:
    """The file that defines ``obj``'s code (a function, class or instance), if any.

    Example:
        >>> source_file(utc_iso).name
        'sysinfo.py'
    """
    try:
        found = inspect.getsourcefile(_code_target(obj))
    except (TypeError, OSError):
        return None
    return Path(found).resolve() if found and os.path.isfile(found) else None


def git_facts(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{"commit", "dirty", "root"}`` of the git tree holding ``directory``, or ``None``.

    ``dirty`` is ``True`` when ``git status --porcelain`` lists anything (untracked
    files included) and ``None`` when that took longer than :data:`GIT_TIMEOUT`.
    Answers are reused for :data:`GIT_CACHE_SECONDS`. Git runs without optional locks,
    so it never competes with a commit in the same tree.

    Example:
        >>> git_facts("/") is None or "commit" in git_facts("/")
        True
    """
    key = os.fspath(directory)
    now = time.monotonic()
    with _git_lock:
        hit = _git_cache.get(key)
        if hit is not None and now - hit[0] < GIT_CACHE_SECONDS:
            return dict(hit[1]) if hit[1] is not None else None
    found = _ask_git(key)
    with _git_lock:
        _git_cache[key] = (now, found)
    return dict(found) if found is not None else None


def _ask_git(directory: str) -> dict[str, Any] | None:
    head = _git(directory, "rev-parse", "--show-toplevel", "HEAD")
    if head is None or len(head.splitlines()) != 2:
        return None  # not a git tree, no commit yet, or no git
    root, commit = head.splitlines()
    status = _git(directory, "status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status.strip()), "root": root}


def _git(directory: str, *args: str) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", "-C", directory, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):  # git missing, or too slow
        return None
    return done.stdout if done.returncode == 0 else None


def _first_git(targets: list[Any]) -> dict[str, Any] | None:
    """Git facts of the first target defined outside the library and the installed packages."""
    for target in targets:
        path = source_file(target)
        if path is not None and not _installed(path):
            return git_facts(path.parent)
    return None


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[Path, ...]:
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    dirs = {Path(p).resolve() for p in (sysconfig.get_paths().get(n) for n in names) if p}
    dirs.add(Path(__file__).resolve().parent)  # crystallize itself, even when installed editable
    return tuple(dirs)


def _installed(path: Path) -> bool:
    return any(path.is_relative_to(d) for d in _library_dirs())


def _versions() -> dict[str, str]:
    core = getattr(sys.modules.get("crystallize"), "__version__", None)
    versions = {"python": platform.python_version(), "crystallize": core or _version("crystallize-lab")}
    for dist in ("numpy", "ray"):
        # The loaded module's own version when it is imported (what the runs use);
        # else the installed one, read from package metadata once per process.
        found = getattr(sys.modules.get(dist), "__version__", None) or _version(dist)
        if found:
            versions[dist] = found
    return {k: v for k, v in versions.items() if v}


@functools.lru_cache(maxsize=8)
def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _user_packages(targets: list[Any]) -> dict[str, str]:
    """Installed distributions of the top-level modules the targets' code refers to."""
    names: set[str] = set()
    for target in targets:
        module = sys.modules.get(getattr(target, "__module__", None) or "")
        scope = getattr(target, "__globals__", None) or (vars(module) if module else {})
        names.add((getattr(target, "__module__", None) or "").partition(".")[0])
        for value in list(scope.values()):
            if isinstance(value, types.ModuleType):
                names.add(value.__name__.partition(".")[0])
            elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
                names.add((getattr(value, "__module__", None) or "").partition(".")[0])
    names -= _NOT_USER | set(sys.stdlib_module_names) | {""}
    distributions = _distributions()
    found: dict[str, str] = {}
    for name in names:
        for dist in distributions.get(name, ()):
            version = _version(dist)
            if version:
                found[dist] = version
    return dict(sorted(found.items()))


def _code_target(obj: Any) -> Any:
    """A function step's or source's function; an instance's class; else ``obj``."""
    fn = getattr(obj, "fn", None)
    if callable(fn) and hasattr(fn, "__code__"):
        return fn
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
        return obj
    return type(obj)
