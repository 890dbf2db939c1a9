"""The run journal: each finished run appended durably, so a driver that dies can resume.

``Experiment.run()`` appends every run that finishes to a journal file as its result
arrives; ``run(resume=True)`` (``crystallize run --resume``) reads it back and submits
only the runs it lacks. The result equals an uninterrupted run's: same metrics, seeds,
provenance and hypotheses.

Where::

    $CRYSTALLIZE_HOME/journals/<experiment>-<fingerprint>.jsonl    (CRYSTALLIZE_HOME
    ./.crystallize/journals/...                                      unset: ./.crystallize)

or the directory given as ``Experiment(journal="path/to/dir")``; ``journal=False``
keeps none. Line 1 is a header: the experiment's fingerprint, its parts, and the base
seed in force (``SeedPlugin(seed=None)`` draws one per run; a resumed run reuses the
journal's). Every further line is one run in the record format of
:mod:`crystallize.records`, the one ``Result.save`` writes.

The fingerprint covers what decides a run's outcome: each step (the cache's step key:
identity, constructor arguments, code, explicit parameters), the data source,
treatments, ``initial_ctx``, plugins with replicate hooks, and the seed (given, or
"drawn"). It leaves out the number of replicates (replicate *r* is the same run
whatever the total, so a resume may also extend an experiment) and hypotheses (they
never change a run and are evaluated afresh on the resumed result). A journal of a
changed experiment is never resumed from: a warning says what changed, and every run
executes.

Durability: results are group-committed. The driver only queues each run (a deque
append); a writer thread encodes the queue, writes it with one ``write()`` and
fsyncs it every ``COMMIT_SECONDS`` and when the run ends, so a ``kill -9`` (or a lost
node) loses at most the runs of the last half second. A torn last line (the driver
died mid-write) is ignored when read and cut off before new lines are appended; a
damaged line anywhere is skipped, and that run simply executes again. Failed runs are
not reused: a resume gives them another chance. The file is locked while a run
writes it (POSIX record locks, which forked workers do not inherit); a second driver
of the same experiment in the same place keeps no journal and says so.

A journal is an optimisation of recovery: if it cannot be read or written, one
warning is logged and the runs go on without it; it never costs a run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .journal_key import changes, fingerprint
from .plugins import SeedPlugin
from .record_json import run_to_json
from .records import RecordError, run_from_record
from .run_result import RunResult
from .sysinfo import utc_iso

try:
    import fcntl
except ImportError:  # Windows: no record locks; journals are not guarded against a second writer
    fcntl = None  # type: ignore[assignment]

__all__ = ["COMMIT_SECONDS", "ENV_HOME", "JOURNAL_VERSION", "Journal", "fingerprint", "journal_dir", "reusable"]

log = logging.getLogger("crystallize.journal")

#: The format of the journal's header line.
JOURNAL_VERSION = 1
#: The longest a finished run waits in memory before it is written and fsynced.
COMMIT_SECONDS = 0.5
#: The environment variable naming crystallize's working directory (default ``./.crystallize``).
ENV_HOME = "CRYSTALLIZE_HOME"
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
# Runs written per write(): small enough that the text is built in memory already in
# use (one big join of a long queue costs page faults), large enough for few calls.
_CHUNK_LINES = 128


def journal_dir(setting: Any = None) -> Path | None:
    """The directory journals go to for ``Experiment(journal=setting)``.

    Args:
        setting: ``False`` for none; a path for that directory; ``None`` or ``True``
            for ``$CRYSTALLIZE_HOME/journals``, else ``./.crystallize/journals``.

    Returns:
        An absolute path (not created yet), or ``None`` when journaling is off.

    Example:
        >>> journal_dir(False) is None, journal_dir("/tmp/j")
        (True, PosixPath('/tmp/j'))
    """
    if setting is False:
        return None
    if setting is None or setting is True:
        return Path(os.environ.get(ENV_HOME) or ".crystallize").absolute() / "journals"
    return Path(setting).absolute()


class Journal:
    """One ``run()``'s journal: the runs it can reuse, and the writer of new ones.

    Made by :meth:`open`; every method is safe to call on a journal that is off or
    that failed (it then does nothing), and none raises.

    Attributes:
        path: the journal file, or ``None`` when journaling is off.
        runs: ``(replicate, condition)`` -> the successful run read back on resume.
        seed: the base seed the journal recorded (a resume reuses it), or ``None``.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.runs: dict[tuple[int, str], RunResult] = {}
        self.seed: int | None = None
        self._fd: int | None = None
        self._fingerprint = ""
        self._parts: dict[str, Any] = {}
        self._resumed = False
        self._writer: _Writer | None = None

    @classmethod
    def open(cls, experiment: Any, *, resume: bool = False) -> Journal:
        """Find, lock and (with ``resume``) read the journal of ``experiment``.

        Args:
            experiment: the experiment prepared for this ``run()``, before its
                plugins' ``before_run`` (its ``journal`` attribute says where).
            resume: read the runs back (else the journal starts afresh at :meth:`start`).

        Returns:
            The journal; one that is off (``journal=False``) or could not be opened
            (logged once) does nothing.

        Warns:
            UserWarning: ``resume`` is asked but the journal there was written by a
                changed experiment (saying what changed); every run then executes.

        Example:
            >>> journal = Journal.open(experiment, resume=True)  # doctest: +SKIP
            >>> journal.start(experiment); journal.append(run); journal.close()  # doctest: +SKIP
        """
        folder = journal_dir(getattr(experiment, "journal", None))
        if folder is None:
            return cls()
        try:
            digest, parts = fingerprint(experiment)
        except Exception as exc:  # never cost a run
            log.warning(
                "Experiment %r: its fingerprint could not be computed (%s: %s); it runs "
                "without a journal and cannot be resumed.",
                experiment.name,
                type(exc).__name__,
                exc,
            )
            return cls()
        name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(experiment.name)).strip("._")[:150] or "experiment"
        path = folder / f"{name}-{digest[:16]}.jsonl"
        journal = cls(path)
        journal._fingerprint, journal._parts = digest, parts
        try:
            folder.mkdir(parents=True, exist_ok=True)
            journal._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            if not _lock(journal._fd):
                journal._off(
                    f"another process is writing {journal.path} (the same experiment "
                    f"running twice here?); this run keeps no journal"
                )
                return journal
            if resume:
                journal._read(experiment, folder, name)
        except OSError as exc:
            journal._off(f"{type(exc).__name__}: {exc}")
        return journal

    def start(self, experiment: Any) -> None:
        """Write the header (a fresh journal) or cut a torn tail (a resumed one); start the writer."""
        if self._fd is None:
            return
        try:
            if not self._resumed:
                os.ftruncate(self._fd, 0)
                seed = next((p.base_seed for p in experiment.plugins if isinstance(p, SeedPlugin)), None)
                header = {
                    "journal": JOURNAL_VERSION,
                    "experiment": str(experiment.name),
                    "fingerprint": self._fingerprint,
                    "seed": seed,
                    "created": utc_iso(time.time()),
                    "parts": self._parts,
                }
                _write_all(self._fd, (_ENCODER.encode(header) + "\n").encode())
                os.fsync(self._fd)
                _remove_stale(self.path)  # type: ignore[arg-type]
            self._writer = _Writer(self._fd, self.path, self._off)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            self._off(f"{type(exc).__name__}: {exc}")

    def append(self, run: RunResult) -> None:
        """Queue a finished run; it is written and fsynced within ``COMMIT_SECONDS``."""
        if self._writer is not None:
            self._writer.queue.append(run)

    def close(self) -> None:
        """Write what is queued, fsync, stop the writer and release the file. Idempotent."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)  # releases the lock too
            except OSError:
                pass

    # -- internals ------------------------------------------------------------
    def _off(self, why: str) -> None:
        """Step aside for the rest of this run, with one warning."""
        log.warning(
            "The run journal %s cannot be used (%s). The runs go on without it, but a "
            "driver that dies now cannot resume them.",
            self.path,
            why,
        )
        self._writer = None
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _read(self, experiment: Any, folder: Path, name: str) -> None:
        assert self._fd is not None and self.path is not None
        data = _read_all(self._fd)
        if not data:
            stale = _newest_other(folder, name, self.path)
            if stale is not None:
                _warn_changed(experiment.name, stale, self._parts)
            else:
                log.info("Experiment %r: no journal at %s yet; every run executes.", experiment.name, self.path)
            return
        lines = data.split(b"\n")
        try:
            header = json.loads(lines[0])
            if header.get("journal") != JOURNAL_VERSION or header.get("fingerprint") != self._fingerprint:
                raise RecordError(f"a header of format {header.get('journal')!r} for another fingerprint")
        except (ValueError, AttributeError) as exc:
            log.warning(
                "The run journal %s has an unreadable header (%s); it is started afresh and every run executes.",
                self.path,
                exc,
            )
            return
        damaged = 0
        for line in lines[1:-1]:  # the last piece is empty, or a torn line
            try:
                run = run_from_record(json.loads(line))
            except (ValueError, TypeError, KeyError):
                damaged += 1
                continue
            if run.error is None:
                self.runs[(run.replicate, run.condition)] = run
        if damaged:
            log.warning("The run journal %s has %d damaged line(s); those runs execute again.", self.path, damaged)
        seed = header.get("seed")
        self.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        os.ftruncate(self._fd, len(data) - len(lines[-1]))  # cut a torn last line
        self._resumed = True


class _Writer:
    """The group commit: a thread that encodes, writes and fsyncs the queued runs."""

    def __init__(self, fd: int, path: Path, fail: Any) -> None:
        self.queue: deque[RunResult] = deque()
        self._fd, self._path, self._fail = fd, path, fail
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._broken = False
        self._thread = threading.Thread(target=self._loop, name="crystallize-journal", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.wait(COMMIT_SECONDS):
            self.commit()

    def commit(self) -> None:
        with self._lock:
            if self._broken or not self.queue:
                return
            lines: list[str] = []
            while self.queue:
                run = self.queue.popleft()
                try:
                    lines.append(run_to_json(run))
                except Exception as exc:  # that run executes again on resume
                    log.warning(
                        "Replicate %d, condition %r could not be written to the run journal "
                        "(%s: %s); a resume runs it again.",
                        run.replicate,
                        run.condition,
                        type(exc).__name__,
                        exc,
                    )
                if len(lines) == _CHUNK_LINES and not self._write(lines):
                    return
            if lines and not self._write(lines):
                return
            self._sync()

    def _write(self, lines: list[str]) -> bool:
        """Append ``lines`` (emptying the list); ``False`` if the journal broke."""
        lines.append("")  # the newline that ends the last line, without copying the text again
        try:
            _write_all(self._fd, "\n".join(lines).encode())
        except OSError as exc:
            self._break(exc)
            return False
        lines.clear()
        return True

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._break(exc)

    def _break(self, exc: OSError) -> None:
        self._broken = True
        self.queue.clear()
        self._fail(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self.commit()


def _lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _others(folder: Path, name: str, path: Path) -> list[Path]:
    return [p for p in folder.glob(f"{name}-*.jsonl") if p != path and p.stem[len(name) + 1 :].isalnum()]


def _newest_other(folder: Path, name: str, path: Path) -> Path | None:
    others = _others(folder, name, path)
    return max(others, key=lambda p: p.stat().st_mtime) if others else None


def _remove_stale(path: Path) -> None:
    """A fresh journal replaces the journals of earlier versions of the same experiment."""
    name = path.stem.rsplit("-", 1)[0]
    for other in _others(path.parent, name, path):
        try:
            fd = os.open(other, os.O_RDWR)
        except OSError:
            continue
        try:
            if _lock(fd):  # not being written right now
                other.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def _warn_changed(name: str, stale: Path, parts: Mapping[str, Any]) -> None:
    try:
        with open(stale, "rb") as fh:
            header = json.loads(fh.readline())
            runs = sum(1 for _ in fh)
        changed = changes(header.get("parts") or {}, parts)
    except (OSError, ValueError, AttributeError):
        changed, runs = "it could not be read", 0
    warnings.warn(
        f"Experiment {name!r} changed since its journal {stale} was written ({changed}), so its "
        f"{runs} journaled run(s) are not reused: every run executes, into a new journal. Resume "
        f"continues only the experiment that wrote the journal.",
        UserWarning,
        stacklevel=6,
    )


def reusable(journal: Journal, plan: Sequence[Any]) -> list[RunResult]:
    """The journaled runs among ``plan``'s specs, in plan order."""
    return [journal.runs[(s.replicate, s.condition)] for s in plan if (s.replicate, s.condition) in journal.runs]
