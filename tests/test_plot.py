"""result.plot(): real PNG files, one panel per numeric metric, verdicts in the title."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import pytest

from crystallize import (
    Experiment,
    Result,
    RunResult,
    Treatment,
    hypothesis,
    pipeline_step,
    verifier,
)

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("matplotlib.text")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pipeline_step()
def measure(data, ctx, *, lr=0.1):
    r = ctx["replicate"]
    return data, {"accuracy": 0.5 + lr + r / 100, "loss": 1 - lr + r / 50, "epochs": 3 + r, "label": f"run{r}"}


@verifier
def higher(baseline, treatment, *, metric="accuracy"):
    gain = sum(treatment[metric]) / len(treatment[metric]) - sum(baseline[metric]) / len(baseline[metric])
    return {"gain": gain, "significant": gain > 0}


def _result():
    exp = Experiment(
        lambda ctx: None,
        [measure()],
        name="lr-sweep",
        treatments=[Treatment("lr=0.2", {"lr": 0.2}), Treatment("lr=0.3", {"lr": 0.3})],
        hypotheses=[hypothesis(verifier=higher(), metrics="accuracy", name="faster")(lambda r: -r["gain"])],
    )
    return exp.run(replicates=4)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _texts(fig):
    """Every text drawn on the figure: titles, labels, notes."""
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


def _drawn(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_one_metric_is_one_panel_in_a_real_png(tmp_path):
    path = tmp_path / "accuracy.png"
    fig = _result().plot(metric="accuracy", path=path)
    width, height = _png_size(path)
    assert width > 100 and height > 100
    assert [ax.get_title() for ax in _drawn(fig)] == ["accuracy"]
    labels = [t.get_text() for t in _drawn(fig)[0].get_xticklabels()]
    assert labels == ["baseline\n(n=4)", "lr=0.2\n(n=4)", "lr=0.3\n(n=4)"]


def test_every_numeric_metric_gets_a_panel_and_the_others_a_note(tmp_path):
    path = tmp_path / "all.png"
    fig = _result().plot(path=path)
    assert _png_size(path)[0] > 0
    assert [ax.get_title() for ax in _drawn(fig)] == ["accuracy", "loss", "epochs"]
    assert "Not drawn (values are not all numbers): label" in _texts(fig)


def test_the_title_holds_the_hypotheses_ranking_and_verdicts():
    fig = _result().plot(metric="loss")
    title = next(t for t in _texts(fig) if t.startswith("lr-sweep: 12 runs, 0 failed"))
    unwrapped = " ".join(line.strip() for line in title.splitlines())  # long lines wrap to the figure
    assert "faster on accuracy: lr=0.3 (gain=0.2, significant=True) > lr=0.2 (gain=0.1, significant=True)" in unwrapped


def test_plot_refuses_what_it_cannot_draw_and_says_what_it_can():
    result = _result()
    with pytest.raises(ValueError, match=r"no such metric; the result has \['accuracy', 'loss', 'epochs', 'label'\]"):
        result.plot(metric="acc")
    with pytest.raises(ValueError, match=r"not all numbers.*Numeric metrics: \['accuracy', 'loss', 'epochs'\]"):
        result.plot(metric="label")
    only_text = Result([RunResult(0, "baseline", {"label": ["a"]})], ["baseline"])
    with pytest.raises(ValueError, match="no metric has numeric values"):
        only_text.plot()


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # an import of it now fails
    with pytest.raises(ImportError, match=r"pip install 'crystallize-lab\[plot\]'"):
        _result().plot()


def test_saving_needs_no_display_and_leaves_pyplot_alone(tmp_path):
    code = textwrap.dedent(f"""
        import os
        os.environ.pop("DISPLAY", None); os.environ.pop("WAYLAND_DISPLAY", None)
        os.environ["MPLBACKEND"] = "TkAgg"  # a GUI backend that cannot start here: it must not be needed
        from crystallize import Result, RunResult
        result = Result([RunResult(r, c, {{"x": [r * (2 if c == "t" else 1)]}})
                         for r in range(3) for c in ("baseline", "t")], ["baseline", "t"])
        fig = result.plot(path={str(tmp_path / "headless.png")!r})
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == [], "the figure was registered with pyplot"
        print("ok")
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert _png_size(tmp_path / "headless.png")[0] > 0
