"""The user's spec page "Creating Custom Pipeline Steps" (/work/shared/spec/custom-steps.md).

Every code block that does not need an Experiment is copied below exactly as the page
writes it, then used in a Pipeline. Only what the page leaves undefined is added:
``complex_operation`` (section 5) and ``load_heavy_model`` (section 6), plus counters.
Block 1b names ``normalize`` from section 3, so it follows that block here.
"""

from __future__ import annotations


class SpecCalls:
    """Real call counts (an object, so counting does not change any step's code key)."""

    def __init__(self) -> None:
        self.operations = 0
        self.model_loads = 0
        self.predictions = 0

    def __reduce_ex__(self, protocol):
        # Module-level objects a step names are part of its code key, by content. A
        # counter is bookkeeping, not behaviour: its constant reduction says so (the
        # same escape hatch the README gives users).
        return (SpecCalls, ())


SPEC_CALLS = SpecCalls()


def complex_operation(data, method):
    SPEC_CALLS.operations += 1
    if method == "a":
        return [x + 1 for x in data]
    return [x - 1 for x in data]


class HeavyModel:
    def predict(self, data):
        SPEC_CALLS.predictions += 1
        return [round(x * 0.5, 3) for x in data]


def load_heavy_model():
    SPEC_CALLS.model_loads += 1
    return HeavyModel()


# ---- Section 1, block 1 (verbatim) ----------------------------------------------------
from crystallize import FrozenContext, pipeline_step


@pipeline_step(cacheable=True)
def scale_data(data: list, ctx: FrozenContext, *, factor: float = 1.0) -> list:
    """Multiply incoming numeric data by ``factor``.

    The ``factor`` parameter is automatically populated from the context if it
    exists, otherwise its default is used.
    """
    return [x * factor for x in data]


# ---- Section 3 (verbatim) -------------------------------------------------------------
@pipeline_step()
def normalize(data: list, ctx: FrozenContext) -> list:
    scale = ctx.get("scale_factor", 1.0)
    return [x / scale for x in data]


# ---- Section 1, block 2 (verbatim) ----------------------------------------------------
from functools import partial

scaler = scale_data(factor=2.0)  # explicit instantiation
# or later:
steps = [partial(scale_data, factor=2.0), normalize]


# ---- Section 4 (verbatim) -------------------------------------------------------------
@pipeline_step()
def compute_sum(data):
    total = sum(data)
    return data, {"sum": total}


# ---- Section 5 (verbatim) -------------------------------------------------------------
@pipeline_step(cacheable=True)
def heavy_transform(data, ctx: FrozenContext, method: str = "a"):
    # expensive work
    return complex_operation(data, method)


# ---- Section 6 (verbatim) -------------------------------------------------------------
from crystallize import PipelineStep


class ModelStep(PipelineStep):
    cacheable = False  # set to True if outputs can be reused safely

    def __init__(self):
        self.model = load_heavy_model()  # Loaded once when the step is constructed

    def __call__(self, data, ctx):
        return self.model.predict(data)  # Reused across replicates in the same process

    @property
    def params(self):
        return {}


# ---- Section 7 (verbatim) -------------------------------------------------------------
import asyncio


@pipeline_step()
async def fetch_remote(data: str, ctx: FrozenContext) -> str:
    await asyncio.sleep(0.1)
    return data + "!"


# ---- the tests ------------------------------------------------------------------------
import pytest

from crystallize import Pipeline


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRYSTALLIZE_CACHE_DIR", str(tmp_path / "cache"))
    SPEC_CALLS.__init__()
    return tmp_path


def test_section_1_calling_the_factory_returns_a_pipeline_step():
    assert isinstance(scale_data(), PipelineStep)
    assert isinstance(scaler, PipelineStep)
    assert dict(scaler.params) == {"factor": 2.0}
    assert scaler.cacheable is True


def test_section_1_both_forms_work_with_a_pipeline():
    ctx = FrozenContext({"scale_factor": 4.0})
    assert Pipeline(steps).run([1, 2, 3], ctx) == [0.5, 1.0, 1.5]
    assert Pipeline([scaler, normalize()]).run([1, 2, 3], FrozenContext({"scale_factor": 4.0})) == [
        0.5,
        1.0,
        1.5,
    ]


def test_section_2_factor_is_injected_from_ctx_or_defaults():
    assert Pipeline([scale_data]).run([1, 2], FrozenContext({"factor": 3.0})) == [3.0, 6.0]
    assert Pipeline([scale_data]).run([1, 2]) == [1.0, 2.0]
    assert Pipeline([scale_data(factor=5.0)]).run([1, 2], FrozenContext({"factor": 3.0})) == [5.0, 10.0]


def test_section_3_normalize_reads_scale_factor_from_ctx():
    assert Pipeline([normalize]).run([2.0, 4.0], FrozenContext({"scale_factor": 2.0})) == [1.0, 2.0]
    assert Pipeline([normalize()]).run([2.0, 4.0]) == [2.0, 4.0]


def test_section_3_replicate_and_metrics_from_ctx():
    @pipeline_step()
    def tag_replicate(data, ctx):
        ctx.metrics.add("replicate_seen", ctx.get("replicate"))
        return data

    ctx = FrozenContext({"replicate": 2})
    Pipeline([tag_replicate, normalize]).run([1.0], ctx)
    assert ctx.metrics["replicate_seen"] == (2,)


def test_section_4_compute_sum_records_a_metric_and_passes_data_on():
    ctx = FrozenContext()
    assert Pipeline([compute_sum]).run([1, 2, 3], ctx) == [1, 2, 3]
    assert ctx.metrics["sum"] == (6,)


def test_section_5_heavy_transform_is_cached_under_dot_cache(isolated_cache, monkeypatch):
    monkeypatch.delenv("CRYSTALLIZE_CACHE_DIR")  # the page's default location
    first, second = FrozenContext(), FrozenContext()
    assert Pipeline([heavy_transform]).run([1, 2], first) == [2, 3]
    assert Pipeline([heavy_transform]).run([1, 2], second) == [2, 3]
    assert SPEC_CALLS.operations == 1
    assert second.provenance[0].cache == "hit"
    record = first.provenance[0]
    assert (isolated_cache / ".cache" / record.step_hash / f"{record.input_hash}.pkl").is_file()


def test_section_5_new_parameters_or_input_run_anew():
    assert Pipeline([heavy_transform]).run([1, 2]) == [2, 3]
    assert Pipeline([heavy_transform(method="b")]).run([1, 2]) == [0, 1]
    assert SPEC_CALLS.operations == 2
    assert Pipeline([heavy_transform(method="b")]).run([1, 2]) == [0, 1]
    assert SPEC_CALLS.operations == 2
    assert Pipeline([heavy_transform]).run([5, 6]) == [6, 7]
    assert SPEC_CALLS.operations == 3
    # A parameter injected from ctx is part of the key too.
    assert Pipeline([heavy_transform]).run([5, 6], FrozenContext({"method": "b"})) == [4, 5]


def test_section_6_model_step_loads_once_and_is_reused_across_replicates():
    step = ModelStep()
    pipeline = Pipeline([step])
    results = [pipeline.run([2, 4], FrozenContext({"replicate": r})) for r in range(3)]
    assert results == [[1.0, 2.0]] * 3
    assert SPEC_CALLS.model_loads == 1
    assert SPEC_CALLS.predictions == 3
    assert pipeline.steps[0] is step


def test_section_7_async_step_runs_from_sync_and_async_code():
    assert Pipeline([fetch_remote]).run("hi") == "hi!"
    assert asyncio.run(Pipeline([fetch_remote()]).arun("hi")) == "hi!"


def test_putting_it_together_without_an_experiment():
    ctx = FrozenContext({"replicate": 0})
    pipeline = Pipeline(
        [
            partial(scale_data, factor=1.5),
            normalize(),
            compute_sum(),
        ]
    )
    assert pipeline.run([1, 2, 3], ctx) == [1.5, 3.0, 4.5]
    assert ctx.metrics["sum"] == (9.0,)
