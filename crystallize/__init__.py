"""crystallize: reproducible experiments from small, cacheable pipeline steps."""

from .cache import CacheEntry, StepCache
from .context import ContextMetrics, FrozenContext
from .errors import (
    ArtifactError,
    ContextMutationError,
    CrystallizeError,
    MissingParameterError,
    ParameterError,
    PipelineError,
    SerializationError,
    StepError,
    UnknownParameterError,
    ValidationError,
)
from .hashing import CACHE_FORMAT_VERSION, hash_value
from .pipeline import Pipeline
from .provenance import StepRecord
from .steps import PipelineStep, pipeline_step
from .stores import CacheStore, LocalCacheStore

__version__ = "0.1.0"

__all__ = [
    "CACHE_FORMAT_VERSION",
    "ArtifactError",
    "CacheEntry",
    "CacheStore",
    "ContextMetrics",
    "ContextMutationError",
    "CrystallizeError",
    "FrozenContext",
    "LocalCacheStore",
    "MissingParameterError",
    "ParameterError",
    "Pipeline",
    "PipelineError",
    "PipelineStep",
    "SerializationError",
    "StepCache",
    "StepError",
    "StepRecord",
    "UnknownParameterError",
    "ValidationError",
    "hash_value",
    "pipeline_step",
]
