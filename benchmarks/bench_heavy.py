"""A heavy step (1 s load, 10 ms call), 40 replicates x 2 conditions on 2 CPUs: loads and wall time, side by side.

    .venv/bin/python benchmarks/bench_heavy.py [--replicates 40] [--load 1.0] [--call-ms 10] [--skip-reference]

The workload: a datasource returning the replicate number and one class step with
``heavy = True`` whose ``setup()`` "loads a model" (sleeps ``--load`` s and appends a
line to a log, so loads are counted in real processes) and whose call spends
``--call-ms`` ms of CPU and records one metric. Every row runs 40 replicates of a
baseline and one treatment (80 runs) and is checked: 80 values, none failed.

Rows, in the order they run:

  process pool            ParallelExecution(max_workers=2, executor_type="process"):
                          one copy of the step per worker process (setup() in each).
  reference process/ray   crystallize-ml 0.27 (/work/refenv), its idiom for a model
                          (``resource_factory``, loaded once per worker process), on
                          its process pool and on its Ray plugin; run by
                          benchmarks/_reference_heavy.py. Skipped with a note when the
                          reference venv is absent.
  RayExecution cold       RayExecution() on a local Ray (num_cpus=2, started and warmed
                          before timing): the pool is placed and set up inside this
                          run() — one actor (one CPU stays for the runs' tasks).
  RayExecution warm       the same experiment's second run(): the pool is reused.
  RayExecution 2 x 0.5    heavy={"Model": {"pool_size": 2, "num_cpus": 0.5}}: two
                          actors (two loads) sharing one CPU, tasks on the other; cold.
  raw Ray actor pool      hand-written: N actors loading in __init__, the driver
                          calling them through ray.util.ActorPool.map, for N = 1 (our
                          default pool's size) and N = 2 (every CPU: no task needs one).

Then the per-call overhead, inside one Ray task, sequential calls:

  raw actor call          ray.get(actor.call.remote(data, payload)) on a threaded
                          actor that returns at once: the floor. ``payload`` is the
                          bytes of a packed StepCall, so every row ships the same data.
  routing                 crystallize_ray's router to the same kind of actor: pick the
                          least-loaded actor, pack the StepCall, send, await the reply
                          without releasing the task's CPU, unpack the effects.
  heavy-step call         the router to a real pool actor (StepHost) running a no-op
                          step: plus the actor's side of the step protocol (rebuild
                          the context, seed the global generators as the run had
                          them, record reads/metrics/additions/generator states).
  heavy-step call + run   plus the run's side: capture the context and generators
                          (``step_call``) and replay the effects into the run.

Goal: routing within 1.3x of the raw actor call. The step protocol (rows 3-4) is what
makes a pooled step's results equal SerialExecution's; it is reported, not hidden.
"""

from __future__ import annotations

import os

# The local Ray lives on loopback for this script only; token auth is not under test.
os.environ["RAY_AUTH_MODE"] = "disabled"

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crystallize import Experiment, ParallelExecution, Pipeline, PipelineStep, Treatment

HERE = Path(__file__).resolve().parent
REFERENCE_PYTHON = Path("/work/refenv/bin/python")
REFERENCE_SCRIPT = HERE / "_reference_heavy.py"
CALLS = 300


def spin(ms: float) -> None:
    """CPU work for ``ms`` milliseconds (a model's forward pass, say)."""
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass


class Model(PipelineStep):
    """Loads its "model" in setup(): ``load`` seconds, once where it lives."""

    heavy = True

    def __init__(self, log: str, load: float, call_ms: float):
        self.log, self.load, self.call_ms = log, load, call_ms

    def setup(self, ctx):
        time.sleep(self.load)
        with open(self.log, "a") as fh:
            fh.write(f"load {os.getpid()}\n")
        self.weight = 2.0

    def __call__(self, data, ctx):
        spin(self.call_ms)
        return data, {"value": data * self.weight + ctx.get("offset", 0.0)}


def experiment(backend, log: str, args) -> Experiment:
    return Experiment(
        lambda ctx: float(ctx["replicate"]),
        Pipeline([Model(log, args.load, args.call_ms)]),
        plugins=[backend],
        treatments=[Treatment("shifted", {"offset": 1.0})],
        cache=False,
        name="bench_heavy",
    )


def loads(log: str) -> int:
    return len(Path(log).read_text().splitlines()) if os.path.exists(log) else 0


def timed(exp: Experiment, replicates: int) -> float:
    started = time.perf_counter()
    result = exp.run(replicates=replicates)
    seconds = time.perf_counter() - started
    values = result.metrics.baseline.metrics.get("value", []) + result.metrics.treatments["shifted"].metrics.get(
        "value", []
    )
    if result.errors or len(values) != 2 * replicates:
        raise RuntimeError(f"{exp.name}: {len(result.errors)} failed, {len(values)} values; {result.errors[:1]}")
    return seconds


def new_log() -> str:
    return tempfile.mktemp(prefix="bench-heavy-", suffix=".log")


# -- rows ---------------------------------------------------------------------------------
def row_process(args) -> dict:
    log = new_log()
    seconds = timed(experiment(ParallelExecution(max_workers=2, executor_type="process"), log, args), args.replicates)
    return {"row": "process pool (2 workers)", "seconds": seconds, "loads": loads(log)}


def rows_reference(args) -> list[dict]:
    if not REFERENCE_PYTHON.exists():
        return [{"row": "reference", "note": f"skipped: {REFERENCE_PYTHON} does not exist"}]
    out = []
    for backend in ("process", "ray"):
        if (
            backend == "ray"
            and subprocess.run([str(REFERENCE_PYTHON), "-c", "import ray"], capture_output=True).returncode != 0
        ):
            out.append({"row": "reference ray", "note": f"skipped: no ray in {REFERENCE_PYTHON.parent.parent}"})
            continue
        log = new_log()
        env = {
            **os.environ,
            "CRYSTALLIZE_REF_HEAVY_LOG": log,
            "CRYSTALLIZE_REF_HEAVY_LOAD": str(args.load),
            "CRYSTALLIZE_REF_HEAVY_CALL_MS": str(args.call_ms),
        }
        proc = subprocess.run(
            [str(REFERENCE_PYTHON), str(REFERENCE_SCRIPT), "--backend", backend, "--replicates", str(args.replicates)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        report = json.loads(lines[-1]) if lines else {"error": proc.stderr[-300:]}
        name = f"reference {backend} ({report.get('version', '?')})"
        if "error" in report:
            out.append({"row": name, "note": f"failed: {report['error']}"})
        else:
            note = "incl. its ray.init + shutdown" if backend == "ray" else ""
            out.append({"row": name, "seconds": report["seconds"], "loads": report["loads"], "note": note})
    return out


def rows_ray(args) -> list[dict]:
    from crystallize_ray import RayExecution

    out = []
    log = new_log()
    exp = experiment(RayExecution(), log, args)
    cold = timed(exp, args.replicates)
    out.append(
        {"row": "RayExecution, cold", "seconds": cold, "loads": loads(log), "note": "places and sets up the pool"}
    )
    warm = timed(exp, args.replicates)
    out.append(
        {
            "row": "RayExecution, warm",
            "seconds": warm,
            "loads": loads(log) - out[-1]["loads"],
            "note": "second run(): pool reused",
        }
    )
    RayExecution().shutdown()  # retire it: the next row's pool needs the CPU
    log2 = new_log()
    two = RayExecution(heavy={"Model": {"pool_size": 2, "num_cpus": 0.5}})
    seconds = timed(experiment(two, log2, args), args.replicates)
    out.append({"row": "RayExecution, 2 x 0.5 CPU", "seconds": seconds, "loads": loads(log2), "note": "cold"})
    two.shutdown()
    return out


class RawModel:
    """The hand-written raw Ray pool's actor: the same load and call."""

    def __init__(self, log: str, load: float, call_ms: float):
        time.sleep(load)
        with open(log, "a") as fh:
            fh.write(f"load {os.getpid()}\n")
        self.call_ms, self.weight = call_ms, 2.0

    def predict(self, item):
        replicate, offset = item
        spin(self.call_ms)
        return replicate * self.weight + offset


def rows_raw_pool(ray, args) -> list[dict]:
    from ray.util import ActorPool

    out = []
    for actors in (1, 2):
        log = new_log()
        started = time.perf_counter()
        handles = [ray.remote(num_cpus=1)(RawModel).remote(log, args.load, args.call_ms) for _ in range(actors)]
        items = [(float(r), offset) for offset in (0.0, 1.0) for r in range(args.replicates)]
        values = list(ActorPool(handles).map(lambda actor, item: actor.predict.remote(item), items))
        seconds = time.perf_counter() - started
        assert len(values) == 2 * args.replicates
        out.append(
            {
                "row": f"raw Ray ActorPool x{actors}",
                "seconds": seconds,
                "loads": loads(log),
                "note": "driver feeds the actors; no tasks",
            }
        )
        for handle in handles:
            ray.kill(handle)
    return out


# -- per-call overhead ------------------------------------------------------------------------
class Echo(PipelineStep):
    heavy = True

    def __call__(self, data, ctx):
        return data


class RawEcho:
    """Returns at once: the raw row's actor, and (with a canned reply) the routing row's."""

    def __init__(self, reply=None):
        self.reply = reply

    def call(self, data, payload):
        if self.reply is None:
            return data
        return ("ok", self.reply, data, 0)


def _raw_calls(actor, payload, calls: int) -> float:
    import ray

    ray.get(actor.call.remote(1, payload))
    started = time.perf_counter()
    for _ in range(calls):
        ray.get(actor.call.remote(1, payload))
    return (time.perf_counter() - started) / calls


def _routed_calls(handle, calls: int, with_context: bool) -> float:
    import asyncio

    from crystallize import FrozenContext, SeedPlugin
    from crystallize.invokers import replay_effects, step_call
    from crystallize_ray._router import router

    route = router(handle)
    ctx = FrozenContext({"replicate": 0, "condition": "baseline"})
    SeedPlugin(seed=1).before_replicate(None, ctx)
    call = step_call(ctx, {})

    async def loop(count: int) -> None:
        nonlocal call
        for _ in range(count):
            if with_context:
                call = step_call(ctx, {})
                replay_effects(await route.call(1, call), call, ctx)
            else:
                await route.call(1, call)

    asyncio.run(loop(3))
    started = time.perf_counter()
    asyncio.run(loop(calls))
    return (time.perf_counter() - started) / calls


def rows_overhead(ray) -> list[dict]:
    from crystallize import FrozenContext, SeedPlugin
    from crystallize.backend import StepEffects, serialize_step
    from crystallize.invokers import step_call
    from crystallize_ray._router import PoolHandle, pack
    from crystallize_ray.pools import _remote_host

    ctx = FrozenContext({"replicate": 0, "condition": "baseline"})
    SeedPlugin(seed=1).before_replicate(None, ctx)
    payload = pack(step_call(ctx, {}))
    raw_actor = ray.remote(RawEcho).options(max_concurrency=5).remote()
    canned = ray.remote(RawEcho).options(max_concurrency=5).remote(pack(StepEffects(None)))
    host = _remote_host(ray).options(max_concurrency=5).remote(serialize_step(Echo(), {}), 1, 1)
    ray.get([host.ready.remote(), canned.call.remote(1, b"")])
    routing = PoolHandle("Canned", "bench-canned", "bench-canned/1", (canned,))
    heavy = PoolHandle("Echo", "bench", "bench/1", (host,))
    raw_task, routed_task = ray.remote(_raw_calls), ray.remote(_routed_calls)
    samples: dict[str, list[float]] = {"raw": [], "routing": [], "heavy": [], "full": []}
    for _ in range(5):  # alternating, medians
        samples["raw"].append(ray.get(raw_task.remote(raw_actor, payload, CALLS)))
        samples["routing"].append(ray.get(routed_task.remote(routing, CALLS, False)))
        samples["heavy"].append(ray.get(routed_task.remote(heavy, CALLS, False)))
        samples["full"].append(ray.get(routed_task.remote(heavy, CALLS, True)))
    for actor in (raw_actor, canned, host):
        ray.kill(actor)
    base = statistics.median(samples["raw"])
    names = {"raw": "raw actor call", "routing": "routing", "heavy": "heavy-step call", "full": "heavy-step call + run"}
    return [
        {"row": names[key], "ms": statistics.median(v) * 1000, "ratio": statistics.median(v) / base}
        for key, v in samples.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=40)
    parser.add_argument("--load", type=float, default=1.0, help="seconds the model takes to load")
    parser.add_argument("--call-ms", type=float, default=10.0, help="CPU milliseconds per call")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"bench_heavy: {args.replicates} replicates x 2 conditions, load {args.load:g} s, call "
        f"{args.call_ms:g} ms; python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n"
    )
    rows = [row_process(args)]  # first: the pool forks from a driver with no Ray threads
    rows += [{"row": "reference", "note": "skipped: --skip-reference"}] if args.skip_reference else rows_reference(args)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        ray.get([ray.remote(spin).remote(1) for _ in range(8)])  # workers up
        rows += rows_ray(args)
        rows += rows_raw_pool(ray, args)
        overhead = rows_overhead(ray)
    finally:
        ray.shutdown()

    print(f"{'row':<30} {'seconds':>8} {'loads':>6}  note")
    print("-" * 72)
    for row in rows:
        seconds = f"{row['seconds']:.2f}" if "seconds" in row else "-"
        print(f"{row['row']:<30} {seconds:>8} {str(row.get('loads', '-')):>6}  {row.get('note', '')}")
    print(f"\nper call, {CALLS} sequential calls inside one Ray task (median of 5):")
    for row in overhead:
        print(f"  {row['row']:<24} {row['ms']:.3f} ms  {row['ratio']:.2f}x")
    ratio = overhead[1]["ratio"]
    print(
        f"\nrouting / raw actor call: {ratio:.2f}x (goal <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'}); "
        f"a whole heavy-step call, step protocol included: {overhead[3]['ratio']:.2f}x"
    )
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
