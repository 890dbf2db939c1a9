"""Quickstart: an experiment with two treatments and a hypothesis, on an embedded local Ray.

    python examples/quickstart.py [--replicates 20]

No cluster is needed: RayExecution starts a local Ray, which stays up for later runs in
this process and goes when it exits. Set RAY_ADDRESS (or run this under `ray job submit`)
to use a cluster.
"""

from __future__ import annotations

import argparse
import statistics

from crystallize import (
    Experiment,
    FrozenContext,
    Pipeline,
    SeedPlugin,
    Treatment,
    hypothesis,
    pipeline_step,
    verifier,
)
from crystallize_ray import RayExecution


@pipeline_step()
def simulate_scores(data: list, ctx: FrozenContext, *, learning_rate: float = 0.01) -> list:
    """A toy 'training run': noisy scores whose mean grows with the learning rate."""
    rng = ctx.get("rng")  # per-run generator from SeedPlugin: reproducible anywhere
    return [x * (1 + 10 * learning_rate) + rng.gauss(0, 0.05) for x in data]


@pipeline_step(cacheable=True)
def summarize(data: list) -> tuple:
    return data, {"score": statistics.fmean(data)}


@verifier
def mean_gain(baseline: dict, treatment: dict, *, metric: str = "score") -> dict:
    """Welch's t statistic of the treatment's mean gain over the baseline."""
    b, t = baseline[metric], treatment[metric]
    gain = statistics.fmean(t) - statistics.fmean(b)
    se = (statistics.variance(b) / len(b) + statistics.variance(t) / len(t)) ** 0.5
    return {"gain": gain, "t": gain / se if se else float("inf")}


@hypothesis(verifier=mean_gain(), metrics="score", name="higher_lr_helps")
def by_t(result: dict) -> float:
    return -result["t"]  # lower ranks first: the strongest gain wins


def build() -> Experiment:
    return Experiment(
        datasource=lambda ctx: [0.5, 0.6, 0.7, 0.8],
        pipeline=Pipeline([simulate_scores(), summarize()]),
        plugins=[SeedPlugin(seed=2024), RayExecution(progress=True)],
        treatments=[
            Treatment("lr_0.05", {"learning_rate": 0.05}),
            Treatment("lr_0.10", {"learning_rate": 0.10}),
        ],
        hypotheses=[by_t],
        initial_ctx={"learning_rate": 0.01},
        name="quickstart",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=20)
    args = parser.parse_args()
    result = build().run(replicates=args.replicates)
    print(result)
    best = result.get_hypothesis("higher_lr_helps").best
    print(f"\nBest treatment: {best}")


if __name__ == "__main__":
    main()
