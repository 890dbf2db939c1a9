"""The public face: one sorted ``__all__``, and the core never imports Ray."""

from __future__ import annotations

import subprocess
import sys

import crystallize

# The whole public surface. Changing it is a deliberate API change: update this list.
PUBLIC = [
    "Artifact",
    "ArtifactError",
    "ArtifactPlugin",
    "ArtifactRecord",
    "AsyncExecution",
    "BASELINE",
    "BackendError",
    "BasePlugin",
    "CACHE_FORMAT_VERSION",
    "CacheEntry",
    "CacheStatus",
    "CacheStore",
    "ConfigurationError",
    "ContextMetrics",
    "ContextMutationError",
    "CrystallizeError",
    "DataSource",
    "ExecutionBackend",
    "Experiment",
    "ExperimentMetrics",
    "FrozenContext",
    "Hypothesis",
    "HypothesisResult",
    "LocalCacheStore",
    "LoggingPlugin",
    "MissingParameterError",
    "ParallelExecution",
    "ParameterError",
    "Pipeline",
    "PipelineError",
    "PipelineStep",
    "ReadThroughStore",
    "Result",
    "RunError",
    "RunResult",
    "RunSpec",
    "RunsFailedError",
    "SeedPlugin",
    "SerialExecution",
    "SerializationError",
    "StepCache",
    "StepError",
    "StepRecord",
    "Treatment",
    "TreatmentMetrics",
    "UnhashableValueError",
    "UnknownParameterError",
    "UnusedTreatmentKeyWarning",
    "UrlStore",
    "ValidationError",
    "Verifier",
    "WorkerCrashedError",
    "aexecute_run",
    "data_source",
    "deserialize_experiment",
    "execute_run",
    "hash_value",
    "hypothesis",
    "path_part",
    "pipeline_step",
    "serialize_experiment",
    "steps_set_up",
    "treatment",
    "verifier",
]
RAY_PUBLIC = ["RayExecution"]


def test_all_is_sorted_and_unique():
    assert crystallize.__all__ == sorted(crystallize.__all__)
    assert len(crystallize.__all__) == len(set(crystallize.__all__))


def test_the_public_surface_is_pinned():
    assert crystallize.__all__ == PUBLIC


def test_the_ray_package_surface_is_pinned():
    import crystallize_ray

    assert crystallize_ray.__all__ == RAY_PUBLIC


def test_every_name_in_all_exists():
    missing = [name for name in crystallize.__all__ if not hasattr(crystallize, name)]
    assert missing == []


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from crystallize import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(crystallize.__all__)


def test_errors_share_one_root():
    for name in (
        "ContextMutationError",
        "ParameterError",
        "MissingParameterError",
        "UnknownParameterError",
        "PipelineError",
        "StepError",
    ):
        assert issubclass(getattr(crystallize, name), crystallize.CrystallizeError), name
    assert issubclass(crystallize.UnknownParameterError, TypeError)


def test_importing_crystallize_does_not_import_ray():
    code = "import crystallize, sys; assert 'ray' not in sys.modules, 'ray was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_importing_crystallize_does_not_import_numpy():
    # Hashing treats arrays specially only when numpy is already loaded.
    code = "import crystallize, sys; assert 'numpy' not in sys.modules, 'numpy was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_core_runs_an_experiment_with_ray_unavailable():
    code = (
        "import sys; sys.modules['ray'] = None  # any import of ray now fails\n"
        "from crystallize import Experiment, ParallelExecution, Pipeline, pipeline_step\n"
        "@pipeline_step()\n"
        "def one(data):\n"
        "    return data, {'x': data}\n"
        "exp = Experiment(lambda ctx: 1, Pipeline([one()]),\n"
        "                 plugins=[ParallelExecution(max_workers=2, executor_type='process')])\n"
        "print(exp.run(replicates=2).metrics.baseline.metrics)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "{'x': [1, 1]}" in done.stdout
