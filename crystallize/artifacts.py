"""Artifacts: files a step produces, carried back in its RunResult and saved by the driver.

Inside a step, ``Artifact("plots/loss.csv").write(text_or_bytes)`` records the bytes in
the run. Because the bytes travel inside the RunResult, artifacts work the same on
every backend (threads, processes, Ray): the driver's :class:`ArtifactPlugin` writes
them under ``<root>/<experiment>/v<N>/<condition>/replicate_<r>/<name>``. A cached
step's artifacts are stored with its cache entry and replayed on a hit.

Each name in that layout (experiment, condition, each ``/``-separated part of an
artifact name) becomes one path part through :func:`path_part`: letters and digits of
any script, ``-``, ``_`` and ``.`` stay; every other character, ``%`` included, is
percent-encoded per UTF-8 byte (``lr=0.1`` -> ``lr%3D0.1``, ``温度`` stays ``温度``).
As ``%`` itself is encoded, distinct names never share a folder. A part over 255 UTF-8
bytes becomes a readable prefix + ``~`` + 16 hex digits of the name's hash + its short
extension; ``~`` appears nowhere else.

No symbolic link below the root is followed, so a link planted in the tree cannot make
a write land outside it. An artifact that cannot be written is recorded in
``run.artifact_errors`` and logged; the run's other artifacts are still written.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .context import active_context
from .errors import ArtifactError
from .hashing import hash_bytes
from .plugins import BasePlugin
from .result import ArtifactRecord

if TYPE_CHECKING:
    from .experiment import Experiment
    from .result import RunResult

__all__ = ["Artifact", "ArtifactPlugin", "path_part", "safe_artifact_path"]

log = logging.getLogger("crystallize.artifacts")

_KEPT = frozenset("-_.")
_MAX_PART_BYTES = 255  # NAME_MAX on Linux, macOS and Windows file systems
_HASH_DIGITS = 16
_MAX_SUFFIX = 16


def path_part(name: str) -> str:
    """Encode one name as one readable folder or file name; distinct names stay distinct.

    The rule is in the module docstring; ``.`` and ``..`` become ``%2E`` and ``%2E%2E``.
    Names that differ only in case still collide on case-insensitive file systems
    (macOS, Windows by default), as may Unicode names such systems normalise;
    :class:`ArtifactPlugin` warns about conditions that differ only in case.

    Args:
        name: a condition, experiment or artifact-name part.

    Returns:
        The encoded part, at most 255 bytes in UTF-8.

    Raises:
        ArtifactError: ``name`` is not a non-empty string.

    Example:
        >>> path_part("lr=0.1"), path_part("lr/0.1"), path_part("温度")
        ('lr%3D0.1', 'lr%2F0.1', '温度')
    """
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"A name used in an artifact path must be a non-empty string, got {name!r}.")
    if name in (".", ".."):
        return name.replace(".", "%2E")
    pieces = [ch if ch.isalnum() or ch in _KEPT else _escape(ch) for ch in name]
    encoded = "".join(pieces)
    if len(encoded.encode("utf-8")) <= _MAX_PART_BYTES:
        return encoded
    tag = "~" + hash_bytes(name.encode("utf-8", "surrogatepass"))[:_HASH_DIGITS]
    dot = encoded.rfind(".")
    suffix = encoded[dot:] if 0 < dot and len(encoded[dot:].encode("utf-8")) <= _MAX_SUFFIX else ""
    budget, used, prefix = _MAX_PART_BYTES - len(tag) - len(suffix.encode("utf-8")), 0, []
    for piece in pieces:  # whole pieces only: never cut a character or an %XX escape
        used += len(piece.encode("utf-8"))
        if used > budget:
            break
        prefix.append(piece)
    return "".join(prefix) + tag + suffix


def _escape(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def safe_artifact_path(name: str) -> PurePosixPath:
    """Check that ``name`` is a relative path that stays inside the artifact root.

    ``/`` (or ``\\``) separates sub-folders; each part is later encoded by :func:`path_part`.

    Raises:
        ArtifactError: for empty names, absolute paths, drive letters, ``..`` parts,
            empty or ``.`` parts (``a//b``, ``a/./b``, ``a/``) and NUL characters.

    Example:
        >>> safe_artifact_path("plots/loss.csv").parts
        ('plots', 'loss.csv')
    """
    if not isinstance(name, str) or not name.strip():
        raise ArtifactError(f"An artifact name must be a non-empty string, got {name!r}.")
    parts = name.replace("\\", "/").split("/")
    if parts[0] == "" or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise ArtifactError(
            f"Artifact name {name!r} would escape the artifact root. Use a relative "
            f"path without '..', such as 'plots/loss.csv'."
        )
    if "\0" in name:
        raise ArtifactError(f"Artifact name {name!r} contains a NUL character; remove it.")
    if any(part in ("", ".") for part in parts):
        raise ArtifactError(
            f"Artifact name {name!r} has an empty or '.' part; write each folder once, "
            f"separated by single '/', such as 'plots/loss.csv'."
        )
    return PurePosixPath(*parts)


class Artifact:
    """A named file a step writes; the bytes are saved by the driver.

    Args:
        name: a relative path such as ``"model.txt"`` or ``"plots/loss.csv"``.

    Raises:
        ArtifactError: the name is empty, would escape the artifact root, or has an
            empty, ``.`` or NUL-holding part.

    Example:
        >>> from crystallize import Experiment, pipeline_step
        >>> report = Artifact("report.txt")
        >>> @pipeline_step()
        ... def summarize(data):
        ...     report.write(f"total={sum(data)}")
        ...     return data
        >>> result = Experiment(lambda ctx: [1, 2], [summarize()]).run()
        >>> result.artifacts
        [(0, 'baseline', ArtifactRecord(name='report.txt', data=b'total=3'))]
    """

    def __init__(self, name: str) -> None:
        self.name = str(safe_artifact_path(name))

    def write(self, data: bytes | bytearray | str) -> None:
        """Record ``data`` (bytes, or text encoded as UTF-8) for the running step."""
        ctx = active_context()
        if ctx is None:
            raise ArtifactError(
                f"Artifact({self.name!r}).write() was called outside a running step; call it inside a pipeline step."
            )
        if isinstance(data, str):
            payload = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            payload = bytes(data)
        else:
            raise ArtifactError(
                f"Artifact({self.name!r}).write() takes bytes or str, got "
                f"{type(data).__name__}; serialize it first (json.dumps, np.save to BytesIO...)."
            )
        ctx._replay_artifact(ArtifactRecord(self.name, payload))

    def __repr__(self) -> str:
        return f"Artifact({self.name!r})"


class ArtifactPlugin(BasePlugin):
    """Save every run's artifacts from the driver.

    Args:
        root_dir: where artifacts go (default ``./artifacts``).
        versioned: write each ``run()`` into a new ``v<N>`` folder (default); with
            ``False`` files go straight under ``<root>/<experiment>`` and are replaced.

    Attributes:
        run_dir: the folder of the latest ``run()``.

    Raises:
        ArtifactError: from ``run()``, before any run starts, when the experiment's
            folder below the root is a symbolic link or not a folder.
    """

    def __init__(self, root_dir: str | os.PathLike[str] = "artifacts", versioned: bool = True) -> None:
        self.root_dir = Path(root_dir)
        self.versioned = versioned
        self.run_dir: Path | None = None
        self._root = self.root_dir.absolute()
        self._run_parts: list[str] = []

    def before_run(self, experiment: Experiment) -> None:
        self._root = self.root_dir.absolute()
        self._root.mkdir(parents=True, exist_ok=True)  # the root itself may be a link: the user's choice
        self._run_parts = [path_part(experiment.name or "experiment")]
        base = _make_dirs(self._root, self._run_parts)
        if self.versioned:
            existing = [int(p.name[1:]) for p in base.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]
            self._run_parts.append(f"v{max(existing, default=-1) + 1}")
        self.run_dir = _make_dirs(self._root, self._run_parts)
        folded: dict[str, str] = {}
        for condition in experiment.conditions:
            other = folded.setdefault(path_part(condition).casefold(), condition)
            if other != condition:
                log.warning(
                    "Conditions %r and %r differ only in case; on a case-insensitive file system "
                    "(macOS, Windows) their artifacts share a folder. Rename one.",
                    other,
                    condition,
                )

    def path_for(self, replicate: int, condition: str, name: str) -> Path:
        """Where the artifact ``name`` of one run is written.

        Raises:
            ArtifactError: no run has started yet, or ``name`` is unsafe.

        Example:
            >>> import tempfile
            >>> from crystallize import Experiment, Treatment, pipeline_step
            >>> exp = Experiment(lambda ctx: 0, [pipeline_step()(lambda data: data)()],
            ...                  name="sweep", treatments=[Treatment("lr=0.1", {"lr": 0.1})])
            >>> plugin = ArtifactPlugin(root_dir=tempfile.mkdtemp())
            >>> plugin.before_run(exp)  # run() does this
            >>> plugin.path_for(0, "lr=0.1", "plots/loss.csv").relative_to(plugin.root_dir).as_posix()
            'sweep/v0/lr%3D0.1/replicate_0/plots/loss.csv'
        """
        return self._root.joinpath(*self._parts(replicate, condition, name))

    def on_run_result(self, experiment: Experiment, run: RunResult) -> None:
        for record in run.artifacts:
            try:
                parts = self._parts(run.replicate, run.condition, record.name)
                _write_file(self._root, parts, record.data)
            except Exception as exc:  # noqa: BLE001 -- one artifact's failure must not cost the others
                message = (
                    f"replicate {run.replicate}, condition {run.condition!r}: artifact "
                    f"{record.name!r} could not be written below {str(self._root)!r}: {_explain(exc)}"
                )
                run.artifact_errors.append(message)
                log.warning("Artifact not written: %s", message)

    def _parts(self, replicate: int, condition: str, name: str) -> list[str]:
        if self.run_dir is None:
            raise ArtifactError("ArtifactPlugin has no run folder yet; it is set when a run starts.")
        names = [path_part(p) for p in safe_artifact_path(name).parts]
        return [*self._run_parts, path_part(condition), f"replicate_{replicate}", *names]


def _make_dirs(root: Path, parts: Sequence[str]) -> Path:
    """Create ``root/parts...`` one folder at a time, refusing any symbolic link."""
    folder = root
    for part in parts:
        folder = folder / part
        try:
            folder.mkdir()
        except FileExistsError:
            pass  # mkdir never follows the last component, so a link ends up here too
        # A link swapped in by a concurrent process after this check is out of scope.
        if folder.is_symlink():
            raise ArtifactError(
                f"{str(folder)!r} is a symbolic link; crystallize follows no link below the artifact "
                f"root {str(root)!r}. Remove the link, or make its target the root_dir."
            )
        if not folder.is_dir():
            raise ArtifactError(f"{str(folder)!r} is a file where a folder is needed; move it away.")
    return folder


def _write_file(root: Path, parts: Sequence[str], data: bytes) -> None:
    """Atomically write ``data`` to ``root/parts...``; a link in place of the file is replaced."""
    folder = _make_dirs(root, parts[:-1])
    tmp = folder / f".crystallize-{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as fh:
            fh.write(data)
        os.replace(tmp, folder / parts[-1])  # rename replaces a link itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _explain(exc: Exception) -> str:
    if isinstance(exc, ArtifactError):
        return str(exc)
    if isinstance(exc, OSError):
        path = exc.filename2 or exc.filename  # for a rename, filename2 is the target
        where = f" at {str(path)!r}" if path else ""
        return (
            f"{type(exc).__name__}: {exc.strerror or exc}{where}. Remove what is in the way there, "
            f"or check that the root is writable and has free space."
        )
    return f"{type(exc).__name__}: {exc}."
