"""The README picture: a learning-rate sweep with a hypothesis, drawn by result.plot().

Run it from anywhere: ``python examples/plot_sweep.py [out.png]`` (needs
``pip install 'crystallize-lab[plot]'``). It writes ``docs/lr-sweep.png`` by default.
"""

import sys
from pathlib import Path

from crystallize import Experiment, SeedPlugin, Treatment, hypothesis, pipeline_step, verifier


@pipeline_step()
def train(data, ctx, *, lr=0.01):
    """A stand-in for training: accuracy peaks near lr=0.03, with per-run noise."""
    rng = ctx["rng"]
    acc = 0.70 + 8 * lr - 120 * lr**2 + rng.gauss(0, 0.01)
    return data, {"accuracy": acc, "loss": 1 - acc + rng.gauss(0, 0.02), "optimizer": "sgd"}


@verifier
def mean_gain(baseline, treatment, *, metric="accuracy"):
    gain = sum(treatment[metric]) / len(treatment[metric]) - sum(baseline[metric]) / len(baseline[metric])
    return {"gain": round(gain, 4), "better": gain > 0}


@hypothesis(verifier=mean_gain(), metrics="accuracy", name="gain")
def largest_gain_first(result):
    return -result["gain"]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "lr-sweep.png"
    exp = Experiment(
        lambda ctx: None,
        [train()],
        plugins=[SeedPlugin(seed=1)],
        name="lr-sweep",
        initial_ctx={"lr": 0.01},
        treatments=[Treatment(f"lr={lr}", {"lr": lr}) for lr in (0.02, 0.03, 0.05)],
        hypotheses=[largest_gain_first],
        cache=False,
    )
    result = exp.run(replicates=12)
    result.plot(path=out)
    print(result)
    print(f"picture: {out}")


if __name__ == "__main__":
    main()
