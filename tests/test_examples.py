"""The spec page's example runs as written, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_spec_page_example_prints_the_sums(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "spec_page.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "{'sum': [9.0, 9.0, 9.0]}" in proc.stdout
    # its cacheable step wrote the cache where it ran, not into the repository
    assert (tmp_path / ".cache").is_dir()


def test_the_readme_picture_is_drawn_from_a_script_in_another_directory(tmp_path):
    out = tmp_path / "sweep.png"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "plot_sweep.py"), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "48 runs, 0 failed" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
