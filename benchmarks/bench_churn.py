"""Runs under churn: a random Ray worker process SIGKILLed every few hundred ms, raw Ray vs RayExecution.

    .venv/bin/python benchmarks/bench_churn.py [--runs 1000] [--every 0.3] [--repeat 1]

Each row runs in a fresh driver process with its own local Ray (``num_cpus=2``); a
thread in that driver SIGKILLs a random worker process of *that* Ray (a child of its
raylet whose title starts with ``ray::``, the agents excepted: killing those takes the
node down) every ``--every`` seconds while the work runs.

Only workers up for ``--min-age`` seconds (default 1) are killed. A worker killed in
its first moments — after it titles itself ``ray::IDLE``, before it registers with
the raylet — holds one of the raylet's ``maximum_startup_concurrency`` start slots (the
node's CPUs: 2 here) until ``worker_register_timeout_seconds`` (60 s) pass, so two
unlucky kills stop a 2-CPU node from starting any worker for a minute, whatever runs
on it: raw Ray's tasks and ours stalled alike that way on this machine. ``--min-age 0``
kills any worker.

Rows:

  raw ray         ``--runs`` tasks of ``--step-ms`` ms (``time.sleep``) submitted at
                  once, ``@ray.remote(max_retries=10)``, then ``ray.get`` of each:
                  what Ray alone does under the same churn.
  RayExecution    ``--runs`` runs of an experiment whose one step sleeps ``--step-ms``
                  ms and records ``ctx["rng"].random()``; ``RayExecution(max_retries=10)``
                  with its defaults (adaptive batches, bounded in-flight window),
                  starting its own Ray (``init_kwargs``), as a script would.
                  Each execution of the step appends a line to a log, so executions
                  beyond the runs are work the churn threw away.

Checked, not just timed: every run comes back exactly once, none failed, and the
metrics equal ``SerialExecution``'s under the same seed (computed without the sleep).
Reported: seconds, kills, lost runs, executions, and the ratio to raw Ray's seconds
(goal: within 1.5x).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Each row's Ray lives on loopback for that row only; token auth is not under test.
os.environ["RAY_AUTH_MODE"] = "disabled"

HERE = Path(__file__).resolve()


# -- the killer -------------------------------------------------------------------------
def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _age(pid: int) -> float:
    """Seconds since ``pid`` started."""
    try:
        started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    return uptime - started / os.sysconf("SC_CLK_TCK")


def ray_workers(session: str, min_age: float = 0.0) -> list[int]:
    """Worker processes of the Ray whose session is ``session`` (children of its raylet)
    that have been up for ``min_age`` seconds."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    raylets = set()
    for pid in pids:
        args = _cmdline(pid)
        if args and args[0].endswith(b"raylet") and any(session.encode() in a for a in args):
            raylets.add(pid)
    return [
        pid
        for pid in pids
        if (args := _cmdline(pid))
        and args[0].startswith(b"ray::")
        and not args[0].endswith(b"Agent")
        and _parent(pid) in raylets
        and _age(pid) >= min_age
    ]


class Churn(threading.Thread):
    """SIGKILL a random worker of this driver's Ray every ``every`` seconds."""

    def __init__(self, session: str, every: float, min_age: float, seed: int = 0) -> None:
        super().__init__(name="churn", daemon=True)
        self.session, self.every, self.min_age = session, every, min_age
        self.kills = 0
        self.stop = threading.Event()
        self.rng = random.Random(seed)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            workers = ray_workers(self.session, self.min_age)
            if workers:
                try:
                    os.kill(self.rng.choice(workers), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


# -- one row, in its own driver -----------------------------------------------------------
def _sleep_ms(ms: float) -> None:
    time.sleep(ms / 1000.0)


def row(mode: str, runs: int, every: float, step_ms: float, min_age: float) -> dict:
    import ray

    init = {
        "address": "local",
        "num_cpus": 2,
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
    }
    churn = None
    try:
        if mode == "raw":
            ray.init(**init)
            churn = Churn(ray.get_runtime_context().get_session_name(), every, min_age)
            task = ray.remote(max_retries=10)(_sleep_ms)
            ray.get([task.remote(0) for _ in range(8)])  # workers up
            churn.start()
            started = time.perf_counter()
            refs = [task.remote(step_ms) for _ in range(runs)]
            errors = 0
            for ref in refs:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:
                    errors += 1
            seconds = time.perf_counter() - started
            return {
                "mode": mode,
                "seconds": seconds,
                "kills": churn.kills,
                "lost": errors,
                "executions": None,
                "same_as_serial": None,
            }
        from crystallize import Experiment, Pipeline, SeedPlugin, SerialExecution, pipeline_step
        from crystallize_ray import RayExecution

        log = tempfile.mktemp(prefix="crystallize-churn-", suffix=".log")

        @pipeline_step()
        def nap(data, ctx, *, pause_ms: float = 0.0, log: str = ""):
            if log:
                with open(log, "a") as fh:
                    fh.write(f"{ctx['replicate']}\n")
            time.sleep(pause_ms / 1000.0)
            return data, {"value": ctx["rng"].random()}

        def experiment(backend, **params):
            return Experiment(
                lambda ctx: 0,
                Pipeline([nap(**params)]),
                plugins=[SeedPlugin(seed=1), backend],
                cache=False,
                name="churn",
            )

        serial = experiment(SerialExecution()).run(replicates=runs)
        # RayExecution starts its own Ray, as a user's script would have it do.
        backend = RayExecution(max_retries=10, init_kwargs=init)
        exp = experiment(backend, pause_ms=step_ms, log=log)
        experiment(backend).run(replicates=8)  # Ray and its workers up
        churn = Churn(ray.get_runtime_context().get_session_name(), every, min_age)
        churn.start()
        started = time.perf_counter()
        result = exp.run(replicates=runs)
        seconds = time.perf_counter() - started
        executions = len(Path(log).read_text().splitlines())
        os.unlink(log)
        replicates = sorted(r.replicate for r in result.runs)
        return {
            "mode": mode,
            "seconds": seconds,
            "kills": churn.kills,
            "lost": len(result.errors) + (runs - len(set(replicates))),
            "duplicated": len(replicates) - len(set(replicates)),
            "executions": executions,
            "same_as_serial": result.metrics.baseline.metrics == serial.metrics.baseline.metrics,
        }
    finally:
        if churn is not None:
            churn.stop.set()
        ray.shutdown()


def run_row(mode: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(HERE),
        "--row",
        mode,
        "--runs",
        str(args.runs),
        "--every",
        str(args.every),
        "--step-ms",
        str(args.step_ms),
        "--min-age",
        str(args.min_age),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cap)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"row {mode} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--every", type=float, default=0.3, help="seconds between kills")
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--min-age", type=float, default=1.0, help="seconds a worker is up before it may be killed")
    parser.add_argument("--repeat", type=int, default=1, help="rows per mode; medians are compared")
    parser.add_argument("--cap", type=float, default=900, help="seconds a row may take")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(row(args.row, args.runs, args.every, args.step_ms, args.min_age)))
        return 0
    print(
        f"bench_churn: {args.runs} runs of {args.step_ms:g} ms, a worker (up >= {args.min_age:g} s) SIGKILLed "
        f"every {args.every:g} s, 2 CPUs, {args.repeat} row(s) per mode, alternating\n"
    )
    rows: dict[str, list[dict]] = {"raw": [], "ours": []}
    for _ in range(args.repeat):
        for mode in ("raw", "ours"):
            report = run_row(mode, args)
            rows[mode].append(report)
            print(json.dumps(report))
    raw = statistics.median(r["seconds"] for r in rows["raw"])
    ours = statistics.median(r["seconds"] for r in rows["ours"])
    print(f"\n{'row':<14} {'seconds':>9} {'kills':>6} {'lost':>5} {'executions':>11} {'== serial':>10}")
    for mode, name in (("raw", "raw ray"), ("ours", "RayExecution")):
        for r in rows[mode]:
            same = "-" if r["same_as_serial"] is None else str(r["same_as_serial"])
            print(
                f"{name:<14} {r['seconds']:>9.1f} {r['kills']:>6} {r['lost']:>5} "
                f"{str(r['executions'] or '-'):>11} {same:>10}"
            )
    print(
        f"\nRayExecution / raw Ray (median seconds): {ours / raw:.2f}x (goal <= 1.5x: "
        f"{'met' if ours / raw <= 1.5 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
