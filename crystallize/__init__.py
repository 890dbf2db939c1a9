"""crystallize: reproducible experiments from small, cacheable pipeline steps.

The public face: everything a user needs is importable from here.
"""

from .artifacts import Artifact, ArtifactPlugin, path_part
from .cache import CacheEntry, StepCache
from .context import ContextMetrics, FrozenContext
from .datasource import DataSource, data_source
from .errors import (
    ArtifactError,
    BackendError,
    ConfigurationError,
    ContextMutationError,
    CrystallizeError,
    MissingParameterError,
    ParameterError,
    PipelineError,
    RunsFailedError,
    SerializationError,
    StepError,
    UnknownParameterError,
    UnusedTreatmentKeyWarning,
    ValidationError,
    WorkerCrashedError,
)
from .execution import AsyncExecution, ExecutionBackend, SerialExecution
from .experiment import Experiment
from .hashing import CACHE_FORMAT_VERSION, UnhashableValueError, hash_value
from .hypotheses import Hypothesis, HypothesisResult, Verifier, hypothesis, verifier
from .parallel import ParallelExecution
from .pipeline import Pipeline
from .plugins import BasePlugin, LoggingPlugin, SeedPlugin
from .provenance import CacheStatus, StepRecord
from .result import (
    ArtifactRecord,
    ExperimentMetrics,
    Result,
    RunError,
    RunResult,
    TreatmentMetrics,
)
from .runner import RunSpec, aexecute_run, execute_run, steps_set_up
from .serialization import deserialize_experiment, serialize_experiment
from .steps import PipelineStep, pipeline_step
from .stores import CacheStore, LocalCacheStore, ReadThroughStore, UrlStore
from .treatments import BASELINE, Treatment, treatment

__version__ = "0.1.0"

__all__ = [
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
