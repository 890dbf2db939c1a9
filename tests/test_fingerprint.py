"""Code fingerprints in one process: values re-read on every call, code told apart.

Modules under test are real files written to a temporary directory and imported, so
``inspect`` finds their source exactly as it finds a user's.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import threading
import warnings

import pytest

from crystallize import Experiment, LocalCacheStore, Pipeline, pipeline_step
from crystallize.fingerprint import code_fingerprint


@pytest.fixture
def load(tmp_path, monkeypatch):
    """Write modules into a fresh directory and import them; forget them afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded: list[str] = []

    def load(name: str, source: str, *, also: dict[str, str] | None = None):
        for other, text in (also or {}).items():
            (tmp_path / f"{other}.py").write_text(textwrap.dedent(text))
            loaded.append(other)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        loaded.append(name)
        importlib.invalidate_caches()
        return importlib.import_module(name)

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


# -- values are read again on every call -------------------------------------------------


def test_rebinding_a_module_constant_changes_the_fingerprint(load):
    mod = load(
        "fp_const",
        """
        FACTOR = 2

        def step(data):
            return [x * FACTOR for x in data]
    """,
    )
    first = code_fingerprint(mod.step)
    assert code_fingerprint(mod.step) == first
    mod.FACTOR = 3
    assert code_fingerprint(mod.step) != first
    mod.FACTOR = 2
    assert code_fingerprint(mod.step) == first


def test_mutating_a_module_level_list_a_helper_reads_changes_the_fingerprint(load):
    mod = load(
        "fp_list",
        """
        LIMITS = [1, 2]

        def helper(x):
            return min(x, max(LIMITS))

        def step(data):
            return [helper(x) for x in data]
    """,
    )
    first = code_fingerprint(mod.step)
    mod.LIMITS.append(3)
    assert code_fingerprint(mod.step) != first
    mod.LIMITS.pop()
    assert code_fingerprint(mod.step) == first


def test_object_constants_count_by_content(load):
    mod = load(
        "fp_objects",
        """
        import dataclasses
        import types

        @dataclasses.dataclass
        class Config:
            lr: float = 0.1

        CONFIG = Config()
        OPTIONS = types.SimpleNamespace(depth=2)

        def step(data):
            return [x * CONFIG.lr + OPTIONS.depth for x in data]
    """,
    )
    first = code_fingerprint(mod.step)
    mod.CONFIG.lr = 0.2
    second = code_fingerprint(mod.step)
    assert second != first
    mod.OPTIONS.depth = 3
    assert code_fingerprint(mod.step) not in (first, second)


def test_values_in_closures_and_defaults_are_read_again(load):
    mod = load(
        "fp_closure",
        """
        def make(weights):
            def step(data, *, offset=[0]):
                return [x * weights[0] + offset[0] for x in data]
            return step
    """,
    )
    weights = [1]
    step = mod.make(weights)
    first = code_fingerprint(step)
    weights[0] = 2
    second = code_fingerprint(step)
    assert second != first
    step.__kwdefaults__["offset"][0] = 5
    assert code_fingerprint(step) not in (first, second)


def test_helpers_reached_through_another_module_are_read_again(load):
    mod = load(
        "fp_uses_helpers",
        """
        import fp_helpers
        from fp_helpers import double

        def step(data):
            return [fp_helpers.shift(double(x)) for x in data]
    """,
        also={
            "fp_helpers": """
        OFFSET = 1

        def double(x):
            return 2 * x

        def shift(x):
            return x + OFFSET
    """
        },
    )
    first = code_fingerprint(mod.step)
    sys.modules["fp_helpers"].OFFSET = 2  # read by fp_helpers.shift, an attribute chain
    assert code_fingerprint(mod.step) != first


def test_a_library_module_reached_through_a_user_module_is_not_walked(load):
    # Fingerprinting reads the attributes a step's code names. A chain that leaves the
    # user's modules for a library (helpers.np.object) stops there, as when the step
    # names the library itself: numpy warns on np.object, and that warning is not the
    # user's doing.
    pytest.importorskip("numpy")
    mod = load(
        "fp_reads_library",
        """
        import fp_uses_numpy

        def step(data):
            return fp_uses_numpy.np.object
    """,
        also={"fp_uses_numpy": "import numpy as np\n"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = code_fingerprint(mod.step)
    assert code_fingerprint(mod.step) == first


def test_an_unhashable_constant_is_named_not_fatal(load):
    mod = load(
        "fp_lock",
        """
        import threading

        LOCK = threading.Lock()

        def step(data):
            with LOCK:
                return data
    """,
    )
    assert code_fingerprint(mod.step) == code_fingerprint(mod.step)
    mod.LOCK = threading.Lock()  # another lock of the same type: same marker
    assert code_fingerprint(mod.step) == code_fingerprint(mod.step)


def test_a_value_that_breaks_on_inspection_gives_a_stable_marker(load):
    mod = load(
        "fp_hostile",
        """
        class Hostile:
            def __getattr__(self, name):
                raise RuntimeError("no attributes here")

            def __reduce_ex__(self, protocol):
                raise RuntimeError("cannot reduce")

        THING = Hostile()

        def step(data):
            return THING, data
    """,
    )
    assert code_fingerprint(mod.step) == code_fingerprint(mod.step)


# -- code is told apart ------------------------------------------------------------------


def test_two_lambdas_on_one_line_differ(load):
    mod = load(
        "fp_lambdas",
        """
        add, mul = (lambda d: d + 1), (lambda d: d * 2)
        same_a, same_b = (lambda d: d + 1), (lambda d: d + 1)
    """,
    )
    assert code_fingerprint(mod.add) != code_fingerprint(mod.mul)
    assert code_fingerprint(mod.same_a) == code_fingerprint(mod.same_b)


def test_a_class_redefined_under_the_same_name_differs_from_the_first(load):
    mod = load(
        "fp_redefined",
        """
        class Step:
            def __call__(self, data, ctx):
                return data + 1

        FIRST = Step

        class Step:
            def __call__(self, data, ctx):
                return data + 2
    """,
    )
    assert mod.FIRST.__qualname__ == mod.Step.__qualname__
    assert code_fingerprint(mod.FIRST) != code_fingerprint(mod.Step)


def test_classes_from_one_factory_differ_by_what_their_methods_captured(load):
    mod = load(
        "fp_factory",
        """
        from crystallize import PipelineStep

        def make_cls(k):
            class Scaled(PipelineStep):
                def __call__(self, data, ctx):
                    return data * k
            return Scaled
    """,
    )
    assert code_fingerprint(mod.make_cls(1)) != code_fingerprint(mod.make_cls(2))
    assert code_fingerprint(mod.make_cls(1)) == code_fingerprint(mod.make_cls(1))


def test_class_attributes_and_base_classes_are_part_of_a_class(load):
    mod = load(
        "fp_bases",
        """
        from crystallize import PipelineStep

        class Base(PipelineStep):
            def transform(self, x):
                return x + 1

        class OtherBase(PipelineStep):
            def transform(self, x):
                return x - 1

        class Step(Base):
            scale = 2

            def __call__(self, data, ctx):
                return self.transform(data) * self.scale

        class Twin(OtherBase):
            scale = 2

            def __call__(self, data, ctx):
                return self.transform(data) * self.scale
    """,
    )
    first = code_fingerprint(mod.Step)
    mod.Step.scale = 3
    assert code_fingerprint(mod.Step) != first
    mod.Step.scale = 2
    assert code_fingerprint(mod.Step) == first
    # Same body, same class attributes; only the inherited method differs.
    mod.Twin.__name__ = mod.Twin.__qualname__ = "Step"
    assert code_fingerprint(mod.Twin) != first


def test_a_function_default_is_followed_as_code(load):
    mod = load(
        "fp_default",
        """
        def plus(x):
            return x + 1

        def minus(x):
            return x - 1

        def step(data, *, fn=plus):
            return [fn(x) for x in data]
    """,
    )
    first = code_fingerprint(mod.step)
    mod.step.__kwdefaults__["fn"] = mod.minus
    assert code_fingerprint(mod.step) != first


def test_the_loaded_code_counts_not_the_file_edited_after_import(load, tmp_path):
    # The fingerprint is of the code that runs: an edit on disk that was never
    # imported changes nothing, and the source is not read again on each call.
    mod = load(
        "fp_loaded",
        """
        def step(data):
            return data
    """,
    )
    first = code_fingerprint(mod.step)
    (tmp_path / "fp_loaded.py").write_text("def step(data):\n    return None\n")
    assert code_fingerprint(mod.step) == first


# -- end to end: a real experiment, run twice in one process ----------------------------

THRESHOLDS = [1]


@pipeline_step(cacheable=True)
def keep_above(data, ctx):
    with open(os.environ["FP_COUNTER_FILE"], "a") as fh:
        fh.write("call\n")
    kept = [x for x in data if x > THRESHOLDS[0]]
    ctx.metrics.add("kept", len(kept))
    return kept


def test_mutating_a_module_level_list_between_runs_is_not_a_stale_hit(tmp_path, monkeypatch):
    counter = tmp_path / "calls.txt"
    monkeypatch.setenv("FP_COUNTER_FILE", str(counter))
    experiment = Experiment(lambda ctx: [1, 2, 3], Pipeline([keep_above()]), cache=LocalCacheStore(tmp_path / "cache"))

    def calls() -> int:
        return len(counter.read_text().splitlines()) if counter.exists() else 0

    try:
        assert experiment.run().metrics.baseline.metrics == {"kept": [2]}
        assert experiment.run().metrics.baseline.metrics == {"kept": [2]}
        assert calls() == 1  # the second run was a hit
        THRESHOLDS[0] = 2
        assert experiment.run().metrics.baseline.metrics == {"kept": [1]}
        assert calls() == 2
    finally:
        THRESHOLDS[0] = 1
