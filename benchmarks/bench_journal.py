"""What the run journal costs per run, and how long resuming a 10,000-run journal takes.

Usage::

    python benchmarks/bench_journal.py [--runs 4000] [--repeat 5] [--resume-runs 10000]

Table 1: no-op runs (the workload of ``bench_local.py``: a constant data source, a
step passing its input on and one recording a metric) with ``journal=False`` and with
a journal, on ``SerialExecution`` and the process pool; best of ``--repeat``, the two
interleaved. The journal's cost per run is the difference, also given as a share of
the run without it (goal: under 25 % on ``SerialExecution``). Serial is the hard case:
encoding each run's line (``records.run_to_json``) competes with the runs for the one
interpreter lock. On the process pool the driver waits for the workers, but on a
machine with as many cores as workers it competes with them for a core, so the
encoding shows there too.

Table 2: a journal of ``--resume-runs`` runs (half baseline, half a treatment) is
written, then ``run(resume=True)`` of the same experiment is timed: fingerprinting,
reading and decoding every record, and aggregating the Result (no run executes). The
read alone (``Journal.open``) is shown beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _checked import METRIC, run_checked

from crystallize import (
    Experiment,
    ParallelExecution,
    Pipeline,
    SerialExecution,
    Treatment,
    data_source,
    pipeline_step,
)
from crystallize.journal import Journal


@data_source
def constant_source(ctx):
    return (1, 2, 3)


@pipeline_step()
def passthrough(data, ctx):
    return data


@pipeline_step()
def record_metric(data, ctx, *, scale: float = 1.0):
    return data, {METRIC: 1.0 * scale}


def probe(backend, journal, runs: int) -> Experiment:
    return Experiment(
        constant_source(),
        Pipeline([passthrough(), record_metric()]),
        plugins=[backend],
        name="journal_probe",
        replicates=runs,
        journal=journal,
        cache=False,
    )


def per_run_table(runs: int, repeat: int, scratch: Path) -> None:
    backends = {
        "SerialExecution": SerialExecution,
        "Parallel process x2": lambda: ParallelExecution(max_workers=2, executor_type="process"),
    }
    print(f"no-op runs: {runs} runs, best of {repeat}; ms per run")
    header = f"{'backend':<24}{'no journal':>12}{'journal':>12}{'cost/run':>12}{'share':>9}"
    print(header)
    print("-" * len(header))
    for label, make in backends.items():
        offs, ons = [], []
        for _ in range(repeat):  # interleaved, so a busy spell on the machine hits both
            offs.append(run_checked(probe(make(), False, runs), runs))
            ons.append(run_checked(probe(make(), scratch / "journals", runs), runs))
        off, on = min(offs) / runs * 1e3, min(ons) / runs * 1e3
        print(f"{label:<24}{off:>12.4f}{on:>12.4f}{on - off:>12.4f}{(on - off) / off:>9.0%}")


def resume_table(runs: int, repeat: int, scratch: Path) -> None:
    replicates = runs // 2

    def exp() -> Experiment:
        return Experiment(
            constant_source(),
            Pipeline([passthrough(), record_metric()]),
            treatments=[Treatment("scaled", {"scale": 2.0})],
            name="resume_probe",
            replicates=replicates,
            journal=scratch / "resume",
            cache=False,
        )

    written = exp().run()
    assert len(written.runs) == runs and not written.errors
    path = Path(written.provenance["journal"])
    resumes, reads = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        result = exp().run(resume=True)
        resumes.append(time.perf_counter() - started)
        assert result.provenance["resumed"] == runs and result.metrics.treatments["scaled"].metrics[METRIC][0] == 2.0
        job = exp()
        started = time.perf_counter()
        journal = Journal.open(job, resume=True)
        reads.append(time.perf_counter() - started)
        assert len(journal.runs) == runs
        journal.close()
    print(f"\nresume: a journal of {runs} runs ({path.stat().st_size / 2**20:.1f} MiB), best of {repeat}")
    header = f"{'measurement':<52}{'seconds':>10}"
    print(header)
    print("-" * len(header))
    print(f"{'run(resume=True), every run resumed (goal < 1 s)':<52}{min(resumes):>10.3f}")
    print(f"{'  of which reading and decoding the journal':<52}{min(reads):>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--resume-runs", type=int, default=10_000)
    args = parser.parse_args()
    print(f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; {sys.platform}\n")
    with tempfile.TemporaryDirectory(prefix="crystallize_bench_journal_") as scratch:
        per_run_table(args.runs, args.repeat, Path(scratch))
        resume_table(args.resume_runs, args.repeat, Path(scratch))


if __name__ == "__main__":
    main()
