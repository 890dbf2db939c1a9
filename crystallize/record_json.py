"""One run's record as a line of JSON, written directly: the run journal's hot path.

:func:`run_to_json` returns exactly the text of ``json.dumps(run_to_record(run))``
(compact separators, no NaN) for the common run — numbers, strings, ``None`` and flat
containers of them, no error and no artifacts — without building the record dict or
running the general encoder, which is several times slower; any other run takes that
general path (:mod:`crystallize.records`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .provenance import StepRecord
from .records import _ENCODER, _STEP_FIELDS, RECORD_VERSION, run_to_record
from .run_result import RunResult

__all__ = ["run_to_json"]


def run_to_json(run: RunResult) -> str:
    """One run's record as a line of compact JSON: ``json.dumps(run_to_record(run))``.

    Exactly the text of ``json.dumps(run_to_record(run), separators=(",", ":"),
    allow_nan=False)``, written directly for the common record (numbers, strings,
    ``None`` and flat containers of them; no error or artifacts), which is several
    times faster than building the dict and encoding it; any other run takes that
    general path. The run journal writes every finished run this way.

    Raises:
        ValueError: a value JSON cannot hold outside a tagged form (a NaN in
            ``StepRecord.waited``), as the general path raises.

    Example:
        >>> run_to_json(RunResult(0, "baseline", metrics={"x": [1.5]}))[:56]
        '{"record":1,"replicate":0,"condition":"baseline","seed":'
    """
    try:
        return _run_json(run)
    except _Unusual:
        return _ENCODER.encode(run_to_record(run))


class _Unusual(Exception):
    """A value the direct encoder leaves to the general path."""


_STR = json.encoder.encode_basestring_ascii  # what the encoder writes for a str
_FLOAT = float.__repr__
_INT = int.__repr__
_LITERALS = {None: "null", True: "true", False: "false"}
# The fields _run_json writes for a StepRecord; if StepRecord changes, every run takes
# the general path until they are brought in line.
_WRITTEN_STEP_FIELDS = (
    "name", "index", "params", "step_hash", "input_hash", "cache",
    "reads", "added", "seconds", "miss_reason", "waited", "served_by",
)  # fmt: skip
_DIRECT = _STEP_FIELDS == _WRITTEN_STEP_FIELDS


def _raw(value: Any) -> str:
    """A field written as it is (not through :func:`encode_value`): exact types only."""
    kind = type(value)
    if kind is str:
        return _STR(value)
    if kind is int:
        return _INT(value)
    if kind is float and math.isfinite(value):
        return _FLOAT(value)
    if value is None or kind is bool:
        return _LITERALS[value]
    raise _Unusual


def _value(value: Any) -> str:
    """``encode_value(value)`` as JSON text, for scalars and flat lists, tuples and dicts."""
    kind = type(value)
    if kind is float and math.isfinite(value):
        return _FLOAT(value)
    if kind is int or kind is str or kind is bool or value is None:
        return _raw(value)
    if isinstance(value, float) and math.isfinite(value):  # numpy.float64 is one
        return _FLOAT(float(value))
    if kind is list:
        return "[" + ",".join([_raw(v) for v in value]) + "]"
    if kind is tuple:
        return '{"$tuple":[' + ",".join([_raw(v) for v in value]) + "]}"
    if kind is dict:
        if not all(type(k) is str and k[:1] != "$" for k in value):
            raise _Unusual
        return "{" + ",".join([_STR(k) + ":" + _value(v) for k, v in value.items()]) + "}"
    raise _Unusual


def _strings(values: Any) -> str:
    """``encode_value(list(values))`` for the ``reads`` and ``added`` of a StepRecord."""
    if type(values) is not tuple:
        raise _Unusual
    return "[" + ",".join([_STR(v) if type(v) is str else _value(v) for v in values]) + "]"


def _run_json(run: RunResult) -> str:
    if not _DIRECT or run.error is not None or run.artifacts or run.artifact_errors or type(run.metrics) is not dict:
        raise _Unusual
    metrics = []
    for name, values in run.metrics.items():
        if type(name) is not str or not isinstance(values, (list, tuple)):
            raise _Unusual
        if len(values) == 1:  # the usual metric: one value per run
            metrics.append(f"{_STR(name)}:[{_number(values[0])}]")
        else:
            metrics.append(f"{_STR(name)}:[{','.join([_value(v) for v in values])}]")
    steps = []
    for step in run.provenance:
        around = _around(step)
        steps.append(around[0] + _number(step.seconds) + around[1])
    replicate, condition, seed, attempts = run.replicate, run.condition, run.seed, run.attempts
    return (
        f'{{"record":{RECORD_VERSION},"replicate":{_INT(replicate) if type(replicate) is int else _raw(replicate)},'
        f'"condition":{_STR(condition) if type(condition) is str else _raw(condition)},'
        f'"seed":{"null" if seed is None else _value(seed)},"seconds":{_number(run.seconds)},'
        f'"attempts":{_INT(attempts) if type(attempts) is int else _raw(attempts)},'
        f'"metrics":{{{",".join(metrics)}}},"error":null,'
        f'"provenance":[{",".join(steps)}],"artifacts":[],"artifact_errors":[]}}'
    )


def _number(value: Any) -> str:
    """:func:`_value`, first trying the usual case: a finite float."""
    if type(value) is float and math.isfinite(value):
        return _FLOAT(value)
    return _value(value)


# A step record is the same text in every run but for its seconds, unless the step
# was cached (its input differs): the text before and after the seconds, remembered by
# the step's fields and its params' names, values and their exact types. Equal keys are
# equal text: 1, 1.0 and True differ in type; 0.0 and -0.0 (equal, but written apart)
# by waited's sign, and params holding a zero are not remembered. By value, not by
# identity: a run unpickled from a worker process holds copies.
_AROUND: dict[tuple[Any, ...], tuple[str, str]] = {}
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _around(step: Any) -> tuple[str, str]:
    if type(step) is not StepRecord:
        raise _Unusual
    params, waited = step.params, step.waited
    key = None
    if (
        type(params) is dict
        and type(step.index) is int
        and step.reads == ()
        and step.added == ()
        and step.step_hash is step.input_hash is step.miss_reason is step.served_by is None
        and type(waited) is float
    ):
        values = tuple(params.values())
        kinds = tuple(map(type, values))
        if _SCALAR_TYPES.issuperset(kinds) and not (float in kinds and 0.0 in values):
            key = (step.name, step.index, step.cache, waited, math.copysign(1.0, waited), *params, *values, *kinds)
            around = _AROUND.get(key)
            if around is not None:
                return around
    name, index, cache = step.name, step.index, step.cache
    if type(name) is not str or type(index) is not int or type(cache) is not str:
        raise _Unusual
    around = (
        f'{{"name":{_STR(name)},"index":{_INT(index)},"params":{_dict(params)},'
        f'"step_hash":{_raw(step.step_hash)},"input_hash":{_raw(step.input_hash)},"cache":{_STR(cache)},'
        f'"reads":{_strings(step.reads)},"added":{_strings(step.added)},"seconds":',
        f',"miss_reason":{_raw(step.miss_reason)},"waited":{_raw(waited)},"served_by":{_raw(step.served_by)}}}',
    )
    if key is not None:
        if len(_AROUND) > 4096:  # a few steps times a few conditions; never let it grow
            _AROUND.clear()
        _AROUND[key] = around
    return around


def _dict(params: Any) -> str:
    if type(params) is not dict:
        raise _Unusual
    return _value(params)
