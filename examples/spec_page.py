"""The spec page's closing example ("Putting It Together"), with its step definitions.

Run: python examples/spec_page.py  ->  {'sum': [9.0, 9.0, 9.0]}
"""

from crystallize import FrozenContext, pipeline_step


@pipeline_step(cacheable=True)
def scale_data(data: list, ctx: FrozenContext, *, factor: float = 1.0) -> list:
    """Multiply incoming numeric data by ``factor``.

    The ``factor`` parameter is automatically populated from the context if it
    exists, otherwise its default is used.
    """
    return [x * factor for x in data]


@pipeline_step()
def normalize(data: list, ctx: FrozenContext) -> list:
    scale = ctx.get("scale_factor", 1.0)
    return [x / scale for x in data]


@pipeline_step()
def compute_sum(data):
    total = sum(data)
    return data, {"sum": total}


from functools import partial

from crystallize import Experiment, FrozenContext, ParallelExecution, Pipeline

# Step definitions from above
exp = Experiment(
    datasource=lambda ctx: [1, 2, 3],
    pipeline=Pipeline(
        [
            partial(scale_data, factor=1.5),
            normalize(),
            compute_sum(),
        ]
    ),
    plugins=[ParallelExecution()],
)
exp.validate()  # optional
result = exp.run(replicates=3)
print(result.metrics.baseline.metrics)
