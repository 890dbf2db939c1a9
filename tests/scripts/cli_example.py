"""An experiment file for tests/test_cli.py to run with `crystallize run`.

Its knobs are initial_ctx values, so the command line sets them with --set:
``lr`` scales the score, ``fail_at`` fails that replicate, ``hang_at`` hangs that
replicate for a minute, ``log`` names a file each execution is noted in.
"""

from __future__ import annotations

import os
import statistics
import time

from crystallize import Experiment, SeedPlugin, Treatment, hypothesis, pipeline_step, verifier


@pipeline_step()
def train(data, ctx, *, lr: float, fail_at: int = -1, hang_at: int = -1, log: str = ""):
    if log:
        with open(log, "a") as fh:
            fh.write(f"{ctx['replicate']} {ctx['condition']}\n")
    if ctx["replicate"] == fail_at:
        raise ValueError(f"loss is nan at lr={lr}")
    if ctx["replicate"] == hang_at:
        time.sleep(60)
    return data, {"score": lr * 10 + ctx["rng"].random() / 100, "pid": os.getpid()}


@verifier
def mean_gain(baseline, treatment, *, metric: str = "score"):
    return {"gain": statistics.fmean(treatment[metric]) - statistics.fmean(baseline[metric])}


@hypothesis(verifier=mean_gain(), metrics="score", name="faster_learns_more")
def by_gain(result):
    return -result["gain"]


def build() -> Experiment:
    return Experiment(
        datasource=lambda ctx: None,
        pipeline=[train()],
        plugins=[SeedPlugin(seed=11)],
        treatments=[Treatment("fast", {"lr": 0.3})],
        hypotheses=[by_gain],
        initial_ctx={"lr": 0.1, "fail_at": -1, "hang_at": -1, "log": ""},
        replicates=2,
        name="cli_example",
    )


experiment = build()

if __name__ == "__main__":
    raise SystemExit("run me with: crystallize run tests/scripts/cli_example.py")
