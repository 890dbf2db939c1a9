"""Starting several real processes so that they race: all ready first, then released at once."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_released_together(
    command: Sequence[str], cwds: Sequence[Path], env: Mapping[str, str], ready: Path, gate: Path, *, what: str
) -> list[str]:
    """Run ``command`` once in each of ``cwds`` (created here), released together; their stdouts.

    Each process must touch a file in ``ready`` when it is set up, then wait for ``gate``
    to exist; once all are ready the gate is created, so they reach the contended part
    at the same moment. Every process must exit 0.
    """
    procs = []
    for cwd in cwds:
        cwd.mkdir()
        procs.append(
            subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < len(procs):
        assert time.monotonic() < deadline, f"the {what} did not start"
        time.sleep(0.01)
    gate.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [out for out, _ in outs]
