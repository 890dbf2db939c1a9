"""A driver for tests/test_interrupt.py to send Ctrl-C (SIGINT) to: one experiment, one backend.

Usage: interrupt_driver.py BACKEND OUTDIR

BACKEND is serial, thread, process, async or ray (two workers each). Replicates 0
and 1 take 0.3 s, every later one 60 s, so the runs in flight when the signal comes
would hold the driver up for a minute if it waited for them. Each run appends
"<replicate> <pid>" to OUTDIR/started.txt when its step starts and to
OUTDIR/finished.txt when it ends. On each result the driver writes the pids of all
its descendant processes to OUTDIR/children.json, so the test knows the workers
before it sends the signal. When run() raises KeyboardInterrupt the script prints
one JSON line describing exc.partial_result, then a second one a little later.
"""

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from crystallize import (
    AsyncExecution,
    BasePlugin,
    Experiment,
    ParallelExecution,
    Pipeline,
    SerialExecution,
    pipeline_step,
)

BACKEND = sys.argv[1]
OUT = Path(sys.argv[2])
FAST, LONG = 0.3, 60.0
SETTLE = 2.0  # time enough for a queued run to start, or a killed worker to be gone


def _note(name: str, replicate: int) -> None:
    with open(OUT / name, "a") as fh:
        fh.write(f"{replicate} {os.getpid()}\n")


def _lines(name: str) -> int:
    path = OUT / name
    return len(path.read_text().splitlines()) if path.exists() else 0


@pipeline_step()
def nap(data, ctx):
    _note("started.txt", ctx["replicate"])
    time.sleep(FAST if ctx["replicate"] < 2 else LONG)
    _note("finished.txt", ctx["replicate"])
    return data, {"value": ctx["replicate"]}


@pipeline_step()
async def anap(data, ctx):
    _note("started.txt", ctx["replicate"])
    await asyncio.sleep(FAST if ctx["replicate"] < 2 else LONG)
    _note("finished.txt", ctx["replicate"])
    return data, {"value": ctx["replicate"]}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc/<pid>/task/<tid>/children."""
    found: list[int] = []
    todo = [pid]
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


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def in_flight_workers_alive() -> list[int]:
    """The worker processes that were inside a run when it was interrupted, if alive."""
    finished = {line.split()[0] for line in (OUT / "finished.txt").read_text().splitlines()}
    started = [line.split() for line in (OUT / "started.txt").read_text().splitlines()]
    pids = {int(pid) for replicate, pid in started if replicate not in finished and int(pid) != os.getpid()}
    return sorted(pid for pid in pids if alive(pid))


class RecordChildren(BasePlugin):
    """Driver side: the workers as they are now, written before the test signals."""

    def on_run_result(self, experiment, run):
        tmp = OUT / "children.json.tmp"
        tmp.write_text(json.dumps(sorted(set(descendants(os.getpid())))))
        tmp.replace(OUT / "children.json")


def backend():
    if BACKEND == "serial":
        return SerialExecution()
    if BACKEND in ("thread", "process"):
        return ParallelExecution(max_workers=2, executor_type=BACKEND, batch_size=1)
    if BACKEND == "async":
        return AsyncExecution(max_concurrency=2)
    if BACKEND == "ray":
        import ray

        from crystallize_ray import RayExecution

        # A fresh Ray on loopback for this script only; token auth is not under test.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        return RayExecution(batch_size=1)
    raise SystemExit(f"unknown backend {BACKEND!r}")


def main() -> None:
    step = anap() if BACKEND == "async" else nap()
    exp = Experiment(
        lambda ctx: None,
        Pipeline([step]),
        plugins=[RecordChildren(), backend()],
        name=f"interrupt_{BACKEND}",
        cache=False,
    )
    try:
        result = exp.run(replicates=30)
    except KeyboardInterrupt as exc:
        partial = exc.partial_result
        children = json.loads((OUT / "children.json").read_text()) if (OUT / "children.json").exists() else []
        print(
            json.dumps(
                {
                    "partial_runs": len(partial.runs),
                    "partial_replicates": sorted(r.replicate for r in partial.runs),
                    "errors": [str(e) for e in partial.errors],
                    "complete": partial.provenance["complete"],
                    "started_at_raise": _lines("started.txt"),
                    "finished_at_raise": _lines("finished.txt"),
                    "children_alive_at_raise": [pid for pid in children if alive(pid)],
                }
            ),
            flush=True,
        )
        time.sleep(SETTLE)
        print(
            json.dumps(
                {
                    "started_later": _lines("started.txt"),
                    "finished_later": _lines("finished.txt"),
                    "in_flight_workers_alive_later": in_flight_workers_alive(),
                }
            ),
            flush=True,
        )
        return
    print(json.dumps({"finished_without_interrupt": len(result.runs)}), flush=True)


if __name__ == "__main__":
    main()
