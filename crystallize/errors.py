"""The exceptions crystallize raises, all under one root.

::

    CrystallizeError
    ├── BackendError              a backend did not return every planned run exactly once
    ├── ConfigurationError        (also a ValueError) an option has an invalid value
    ├── ContextMutationError      a run tried to change a context key it already has
    ├── ParameterError            a step's parameters are wrong
    │   ├── UnknownParameterError     (also a TypeError) a name the step does not take
    │   └── MissingParameterError     no explicit value, no ctx value, no default
    ├── PipelineError             a pipeline cannot be built or run as asked
    ├── StepError                 a step raised; the original is ``__cause__``
    ├── SerializationError        a step or experiment cannot be shipped to a worker
    ├── UnhashableValueError      (also a TypeError; in hashing.py) no canonical digest
    ├── ValidationError           an experiment is structurally wrong
    ├── WorkerCrashedError        the process running a run died (recorded, not raised)
    ├── RunsFailedError           runs failed and the caller asked for that to raise
                                  (``run(strict=True)``, ``result.raise_for_errors()``)
    ├── ArtifactError             an artifact name is unsafe or cannot be written
    └── UnusedTreatmentKeyWarning (also a UserWarning; issued, never raised) a
                                  treatment key nothing seems to read

Every message says what went wrong, where (step, replicate, condition when known)
and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BackendError",
    "ConfigurationError",
    "ContextMutationError",
    "CrystallizeError",
    "MissingParameterError",
    "ParameterError",
    "PipelineError",
    "RunsFailedError",
    "SerializationError",
    "StepError",
    "UnknownParameterError",
    "UnusedTreatmentKeyWarning",
    "ValidationError",
    "WorkerCrashedError",
]


class CrystallizeError(Exception):
    """Root of every error crystallize raises on purpose."""


class ContextMutationError(CrystallizeError):
    """A key already in a :class:`FrozenContext` was set again.

    Attributes:
        key: the key that was written twice.
    """

    def __init__(self, key: str, message: str | None = None) -> None:
        self.key = key
        super().__init__(
            message
            or f"Context key {key!r} is already set and a context never changes a key. "
            f"Add a new key with ctx.add(...) under another name, or set {key!r} "
            f"per condition with a Treatment."
        )


class BackendError(CrystallizeError):
    """A backend returned a run twice, a run that was not planned, or lost one.

    ``run()`` checks that every planned run comes back exactly once; this error
    says which did not, and carries what did finish as ``partial_result``.
    """


class ConfigurationError(CrystallizeError, ValueError):
    """An option of a backend or an experiment has an invalid value.

    Attributes:
        option: the option's name, e.g. ``"batch_size"``.
    """

    def __init__(self, owner: str, option: str, value: object, expected: str) -> None:
        self.option = option
        super().__init__(f"{owner}({option}={value!r}): {option} must be {expected}.")


class ParameterError(CrystallizeError):
    """A step's parameters do not match its signature or the context.

    Attributes:
        step: the step (or data source) whose parameters are wrong, when known.
    """

    def __init__(self, message: str, *, step: str | None = None) -> None:
        self.step = step
        super().__init__(message)


class UnknownParameterError(ParameterError, TypeError):
    """A step was given a parameter its function does not take."""


class MissingParameterError(ParameterError):
    """A required step parameter was neither given, nor in ctx, nor defaulted."""


class PipelineError(CrystallizeError):
    """A pipeline was built from something that is not a step, or run the wrong way."""


class StepError(CrystallizeError):
    """A step raised while it ran. The step's own exception is ``__cause__``.

    Attributes:
        step: the step's name.
        index: the step's position in its pipeline.
    """

    def __init__(self, step: str, index: int, cause: BaseException) -> None:
        self.step = step
        self.index = index
        super().__init__(f"Step {step!r} (position {index} in the pipeline) raised {type(cause).__name__}: {cause}")


class SerializationError(CrystallizeError):
    """A step or experiment could not be pickled for another process or Ray."""


class ValidationError(CrystallizeError):
    """An experiment is structurally wrong; ``problems`` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"The experiment has {len(self.problems)} problem(s):\n{lines}")


class WorkerCrashedError(CrystallizeError):
    """The worker process (or Ray worker) running a run died before it finished.

    Never raised by ``run()``: a run whose worker keeps dying is recorded in
    ``result.errors`` with this type and step ``"worker"``; the other runs finish.
    """


class ArtifactError(CrystallizeError):
    """An artifact name would escape the artifact root, or writing it failed."""


class UnusedTreatmentKeyWarning(CrystallizeError, UserWarning):
    """A treatment sets a context key that nothing seems to read.

    Issued by ``validate()`` and ``run()`` before any run starts when no step or
    data-source parameter is named after the key, no ``initial_ctx`` key sets it and
    no step, data source or plugin spells it in its code: most likely a typo, and then
    the treatment changes nothing. A warning, not an error: code may still read the
    key by a computed name. After the runs, keys that no run read are listed in
    ``result.provenance["unused_treatment_keys"]``.
    Silence it with ``warnings.filterwarnings("ignore", category=UnusedTreatmentKeyWarning)``.
    """


class RunsFailedError(CrystallizeError):
    """Runs of an experiment failed, and the caller asked for that to be an error.

    Raised by ``Experiment.run(strict=True)`` (and ``arun``) and by
    ``Result.raise_for_errors()``, once every run has finished: the message lists each
    failed run (replicate, condition, step, exception) and the first one's traceback.
    The ``crystallize run`` command exits non-zero with it.

    Attributes:
        result: the :class:`~crystallize.Result` with every run, failed or not.
        errors: one ``RunError`` per failed run.

    Example:
        >>> from crystallize import Result, RunError, RunResult
        >>> bad = RunResult(1, "baseline", error=RunError(1, "baseline", "fit", "ValueError", "nan loss"))
        >>> result = Result([RunResult(0, "baseline"), bad], ["baseline"])
        >>> print(str(RunsFailedError(result)).splitlines()[0])
        1 of 2 runs failed:
    """

    #: How many failures the message lists one by one.
    LISTED = 10

    def __init__(self, result: object) -> None:
        self.result = result
        self.errors = list(getattr(result, "errors", []))
        runs = len(getattr(result, "runs", []))
        name = (getattr(result, "provenance", None) or {}).get("name")
        lines = [f"{len(self.errors)} of {runs} runs" + (f" of experiment {name!r}" if name else "") + " failed:"]
        lines += [f"  - {error}" for error in self.errors[: self.LISTED]]
        if len(self.errors) > self.LISTED:
            lines.append(f"  ... and {len(self.errors) - self.LISTED} more")
        first = self.errors[0].traceback.strip() if self.errors and self.errors[0].traceback else ""
        if first:
            lines.append("The first failure's traceback:")
            lines += [f"    {line}" for line in first.splitlines()]
        lines.append(
            "The other runs finished: exc.result holds every run, and exc.result.errors "
            "each failure with its traceback."
        )
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.result,))
