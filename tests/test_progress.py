"""Progress: log lines for a non-terminal stream, a redrawn line on a real pseudo-terminal."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import time

from crystallize import Experiment, SerialExecution, pipeline_step
from crystallize.progress import Progress

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_log_gets_a_start_line_and_a_final_line_between_periodic_lines():
    out = io.StringIO()
    bar = Progress(5, label="crystallize grid", stream=out, every=3600)
    for i in range(5):
        bar.update(failed=i == 3)
    bar.close()
    lines = _lines(out)
    assert len(lines) == 2, lines
    assert re.fullmatch(STAMP + r" crystallize grid: started, 5 runs planned", lines[0])
    assert re.fullmatch(
        STAMP + r" crystallize grid: \[#{24}\] 5/5 runs \(100%\), 1 failed, "
        r"finished in [\d.]+s \([\d.,]+ runs/s\)",
        lines[1],
    )
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_every_zero_writes_a_line_per_run_with_rate_and_eta():
    out = io.StringIO()
    bar = Progress(4, label="job", stream=out, every=0)
    for _ in range(4):
        bar.update()
    bar.close()
    lines = _lines(out)
    assert len(lines) == 1 + 4 + 1
    assert re.search(r"job: \[#{6}\.{18}\] 1/4 runs \( 25%\), 0 failed, 0\.0 runs/s, ETA -$", lines[1])
    assert re.search(r"job: \[#{18}\.{6}\] 3/4 runs \( 75%\), 0 failed, [\d.,]+ runs/s, ETA (\d+s|-)$", lines[3])
    assert "4/4 runs (100%), 0 failed, finished in" in lines[-1]


def test_a_heartbeat_line_comes_while_no_run_finishes():
    out = io.StringIO()
    bar = Progress(3, label="slow", stream=out, every=0.05)
    bar.update()
    deadline = time.monotonic() + 10
    while len(_lines(out)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    bar.close()
    lines = _lines(out)
    assert any(re.search(r"slow: \[#{8}\.{16}\] 1/3 runs \( 33%\), 0 failed, ", line) for line in lines[1:-1])
    assert re.search(r"1/3 runs \( 33%\), 0 failed, stopped after [\d.]+s", lines[-1])
    written = len(lines)
    time.sleep(0.2)
    assert len(_lines(out)) == written  # nothing after close: the heartbeat has stopped


def test_the_final_line_is_written_even_when_runs_stop_early_and_only_once():
    out = io.StringIO()
    bar = Progress(10, label="cut", stream=out, every=3600)
    bar.update(failed=True)
    bar.update()
    bar.close()
    bar.close()
    lines = _lines(out)
    assert len(lines) == 2
    assert re.search(r"cut: \[#{4}\.{20}\] 2/10 runs \( 20%\), 1 failed, stopped after", lines[-1])


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CRYSTALLIZE_PROGRESS_EVERY", "0")
    out = io.StringIO()
    bar = Progress(2, stream=out)
    assert bar.every == 0
    bar.update()
    bar.update()
    bar.close()
    assert len(_lines(out)) == 4


def test_a_bad_interval_in_the_environment_is_named_and_the_default_used(monkeypatch, caplog):
    monkeypatch.setenv("CRYSTALLIZE_PROGRESS_EVERY", "soon")
    with caplog.at_level(logging.WARNING, logger="crystallize.progress"):
        bar = Progress(1, stream=io.StringIO())
    bar.close()
    assert bar.every == 10.0
    assert "CRYSTALLIZE_PROGRESS_EVERY='soon' is not a number of seconds" in caplog.text


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    bar = Progress(2, enabled=False, stream=out, every=0)
    bar.update()
    bar.close()
    assert out.getvalue() == ""


def test_a_broken_stream_costs_no_run(caplog):
    out = io.StringIO()
    bar = Progress(3, stream=out, every=0)
    out.close()  # writing now raises ValueError
    with caplog.at_level(logging.WARNING, logger="crystallize.progress"):
        for _ in range(3):
            bar.update()
        bar.close()
    assert bar.done == 3
    assert caplog.text.count("progress line could not be written") == 1


def _read_all(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end is closed
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_real_terminal_gets_one_line_redrawn_in_place():
    main, secondary = pty.openpty()
    terminal = os.fdopen(secondary, "w")
    try:
        bar = Progress(3, label="tty", stream=terminal, interval=0)
        for _ in range(3):
            bar.update()
        bar.close()
        output = _read_all(main).decode()
    finally:
        terminal.close()
        os.close(main)
    redraws = output.split("\r")[1:]
    assert len(redraws) >= 3, repr(output)
    assert redraws[0].startswith("tty: [########................] 1/3 runs ( 33%)")
    assert re.search(r"tty: \[#{24}\] 3/3 runs \(100%\), 0 failed, finished in", output)
    assert "\x1b[K" in output  # each redraw clears what a longer line left
    assert output.endswith(("\r\n", "\n"))  # the terminal's line is finished
    assert "started" not in output  # log lines are for logs only


@pipeline_step()
def one(data):
    return data, {"x": 1}


def test_an_experiment_in_a_batch_log_ends_with_its_final_line(capsys):
    Experiment(lambda ctx: 0, [one()], plugins=[SerialExecution(progress=True)], name="batch").run(replicates=4)
    err = capsys.readouterr().err.splitlines()
    progress = [line for line in err if "crystallize batch:" in line]
    assert re.fullmatch(STAMP + " crystallize batch: started, 4 runs planned", progress[0])
    assert re.search(r"crystallize batch: \[#{24}\] 4/4 runs \(100%\), 0 failed, finished in", progress[-1])


def test_a_negative_interval_means_a_line_per_run():
    out = io.StringIO()
    bar = Progress(2, stream=out, every=-1)
    bar.update()
    bar.close()
    assert len(_lines(out)) == 3  # started, 1/2, stopped
