"""Artifacts: files a step produces, carried back in its RunResult and saved by the driver.

Inside a step, ``Artifact("plots/loss.csv").write(text_or_bytes)`` records the bytes in
the run. Because the bytes travel inside the RunResult, artifacts work the same on
every backend (threads, processes, Ray): the driver's :class:`ArtifactPlugin` writes
them under ``<root>/<experiment>/v<N>/<condition>/replicate_<r>/<name>``. A cached
step's artifacts are stored with its cache entry and replayed on a hit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .context import active_context
from .errors import ArtifactError
from .plugins import BasePlugin
from .result import ArtifactRecord

if TYPE_CHECKING:
    from .experiment import Experiment
    from .result import RunResult

__all__ = ["Artifact", "ArtifactPlugin", "safe_artifact_path"]


def safe_artifact_path(name: str) -> PurePosixPath:
    """Check that ``name`` is a relative path that stays inside the artifact root.

    Raises:
        ArtifactError: for absolute paths, ``..`` parts, drive letters or empty names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ArtifactError(f"An artifact name must be a non-empty string, got {name!r}.")
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise ArtifactError(
            f"Artifact name {name!r} would escape the artifact root. Use a relative "
            f"path without '..', such as 'plots/loss.csv'."
        )
    return path


class Artifact:
    """A named file a step writes; the bytes are saved by the driver.

    Args:
        name: a relative path such as ``"model.txt"`` or ``"plots/loss.csv"``.

    Raises:
        ArtifactError: the name would escape the artifact root.

    Example:
        >>> report = Artifact("report.txt")
        >>> # inside a step: report.write("accuracy=0.93")
    """

    def __init__(self, name: str) -> None:
        self.name = str(safe_artifact_path(name))

    def write(self, data: bytes | bytearray | str) -> None:
        """Record ``data`` (bytes, or text encoded as UTF-8) for the running step."""
        ctx = active_context()
        if ctx is None:
            raise ArtifactError(
                f"Artifact({self.name!r}).write() was called outside a running step; "
                f"call it inside a pipeline step."
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
    """

    def __init__(self, root_dir: str | os.PathLike[str] = "artifacts", versioned: bool = True) -> None:
        self.root_dir = Path(root_dir)
        self.versioned = versioned
        self.run_dir: Path | None = None

    def before_run(self, experiment: Experiment) -> None:
        base = (self.root_dir / _safe_part(experiment.name or "experiment")).absolute()
        if self.versioned:
            existing = [int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()] if base.exists() else []
            self.run_dir = base / f"v{max(existing, default=-1) + 1}"
        else:
            self.run_dir = base
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, replicate: int, condition: str, name: str) -> Path:
        """Where the artifact ``name`` of one run is written."""
        if self.run_dir is None:
            raise ArtifactError("ArtifactPlugin has no run folder yet; it is set when a run starts.")
        folder = (self.run_dir / _safe_part(condition) / f"replicate_{replicate}").resolve()
        target = (folder / safe_artifact_path(name)).resolve()
        if not target.is_relative_to(folder):
            raise ArtifactError(f"Artifact name {name!r} would escape the artifact root.")
        return target

    def on_run_result(self, experiment: Experiment, run: RunResult) -> None:
        for record in run.artifacts:
            target = self.path_for(run.replicate, run.condition, record.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(record.data)
            os.replace(tmp, target)


def _safe_part(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)) or "_"
