"""A driver for tests/test_journal.py to kill -9 half-way and then resume.

Usage: journal_driver.py BACKEND OUTDIR [--resume]

BACKEND is process or ray (two workers each; ray starts its own local Ray). The
experiment: 30 replicates of a baseline and one treatment, each run 0.1 s, under
``SeedPlugin(seed=None)`` (a seed drawn per run(), which a resume must reuse), with a
hypothesis. Its journal is OUTDIR/journal. Each run appends
"<replicate> <condition> <pid> <time.time()>" to OUTDIR/finished.txt when it ends,
so the test can count executions. On each result the driver writes the pids of its
descendant processes to OUTDIR/children.json (the test cleans up after the kill).
When run() returns it prints one JSON line describing the result.

``build(seed, out, sleep)`` makes the same experiment, for the test's reference run.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from crystallize import (
    BasePlugin,
    Experiment,
    ParallelExecution,
    SeedPlugin,
    Treatment,
    hypothesis,
    pipeline_step,
    verifier,
)

REPLICATES = 30


@pipeline_step()
def work(data, ctx, *, shift: float = 0.0, out: str = "", sleep: float = 0.1):
    time.sleep(sleep)
    value = ctx["rng"].random() + shift
    if out:
        with open(os.path.join(out, "finished.txt"), "a") as fh:
            fh.write(f"{ctx['replicate']} {ctx['condition']} {os.getpid()} {time.time():.6f}\n")
    return data, {"value": value}


@verifier
def mean_gain(baseline, treatment):
    return {"gain": statistics.fmean(treatment["value"]) - statistics.fmean(baseline["value"])}


@hypothesis(verifier=mean_gain(), metrics="value", name="shift_helps")
def by_gain(result):
    return -result["gain"]


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


class RecordChildren(BasePlugin):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_run_result(self, experiment, run):
        tmp = self.out / "children.json.tmp"
        tmp.write_text(json.dumps(sorted(set(descendants(os.getpid())))))
        tmp.replace(self.out / "children.json")


def build(seed: int | None, out: str, sleep: float = 0.1, backend=None, journal=False) -> Experiment:
    plugins = [SeedPlugin(seed=seed)] + ([backend] if backend is not None else [])
    return Experiment(
        datasource=lambda ctx: None,
        pipeline=[work(out=out, sleep=sleep)],
        plugins=plugins,
        treatments=[Treatment("shifted", {"shift": 1.0})],
        hypotheses=[by_gain],
        replicates=REPLICATES,
        name="journal_driver",
        journal=journal,
    )


def main() -> None:
    kind, out, resume = sys.argv[1], Path(sys.argv[2]), "--resume" in sys.argv
    if kind == "process":
        backend = ParallelExecution(max_workers=2, executor_type="process", batch_size=1)
    else:
        import ray

        from crystallize_ray import RayExecution

        # A fresh Ray on loopback for this driver only; token auth is not under test.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        backend = RayExecution(batch_size=1)
    exp = build(None, str(out), backend=backend, journal=str(out / "journal"))
    exp.plugins.append(RecordChildren(out))
    result = exp.run(resume=resume)
    print(
        json.dumps(
            {
                "runs": sorted([r.replicate, r.condition] for r in result.runs),
                "errors": [str(e) for e in result.errors],
                "seed": result.provenance["seed"],
                "resumed": result.provenance["resumed"],
                "journal": result.provenance["journal"],
                "metrics": {
                    "baseline": result.metrics.baseline.metrics,
                    "shifted": result.metrics.treatments["shifted"].metrics,
                },
                "seeds": sorted([r.replicate, r.condition, r.seed] for r in result.runs),
                "hypothesis": result.get_hypothesis("shift_helps").results,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
