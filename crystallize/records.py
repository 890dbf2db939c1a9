"""The record format: a run, a hypothesis result or any value as JSON-safe data.

One encoding, shared by everything that writes results down: ``Result.save`` writes
one :func:`run_to_record` per line of ``runs.jsonl``, and the run journal appends the
same records as runs finish (:func:`run_to_json` writes their text directly).
:func:`run_from_record` rebuilds the exact :class:`~crystallize.RunResult`, so a saved
result loads equal to the one saved.

A record holds only JSON types (``json.dumps(record, allow_nan=False)`` always
works). Values JSON cannot hold are tagged by a one-key object whose key starts with
``$``; an ordinary dict never has such a key (one that does is itself tagged):

==============================  ================================================
value                           encoded as
==============================  ================================================
``None``, bool, int, str,       themselves
finite float
``nan``, ``inf``, ``-inf``      ``{"$float": "nan"}`` (``"inf"``, ``"-inf"``)
tuple, set, frozenset, complex  ``{"$tuple": [...]}``, ``{"$set": [...]}``, ...
bytes                           ``{"$bytes": "<base64>"}``
dict with non-string keys       ``{"$dict": [[key, value], ...]}``
numpy scalar                    the Python number it holds (``np.float64(0.5)`` -> 0.5)
numpy array                     ``{"$ndarray": {"dtype": ..., "shape": ..., "data": ...}}``
anything else                   ``{"$repr": "<repr(value)>", "$type": "module.Class"}``
==============================  ================================================

Nothing is ever pickled: an object of another kind (a model, a ``datetime``) is
stored as its ``repr`` and **comes back as that string**. Pass ``notes=[]`` to learn
which values were stored that way.

Example of a run record (one line of ``runs.jsonl``, indented here)::

    {"record": 1, "replicate": 0, "condition": "lr=0.1", "seed": 1234, "seconds": 0.0123,
     "attempts": 1, "metrics": {"accuracy": [0.91]}, "error": null,
     "provenance": [{"name": "train", "index": 0, "params": {"lr": 0.1},
                     "step_hash": null, "input_hash": null, "cache": "off",
                     "reads": ["lr"], "added": [], "seconds": 0.0119}],
     "artifacts": [], "artifact_errors": []}
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from .errors import CrystallizeError
from .hypotheses import HypothesisResult
from .provenance import StepRecord
from .run_result import ArtifactRecord, RunError, RunResult

__all__ = [
    "RECORD_VERSION",
    "RecordError",
    "decode_value",
    "encode_value",
    "hypothesis_from_record",
    "hypothesis_to_record",
    "run_from_record",
    "run_to_json",
    "run_to_record",
]

#: The version of the record format; a record carries it as ``record``.
RECORD_VERSION = 1

_STEP_FIELDS = tuple(f.name for f in fields(StepRecord))
_ERROR_FIELDS = tuple(f.name for f in fields(RunError))
#: How a record becomes one line: compact, and never a bare NaN (JSON has none).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class RecordError(CrystallizeError, ValueError):
    """A record or saved result cannot be read: corrupt, truncated or of a newer format."""


# -- values ------------------------------------------------------------------------


def encode_value(value: Any, notes: list[str] | None = None, where: str = "value") -> Any:
    """``value`` as JSON types, tagged where JSON has no such type (see the module doc).

    Args:
        value: anything.
        notes: when given, one message is appended per value stored as its ``repr``.
        where: names the value in those messages.

    Returns:
        Data that ``json.dumps(..., allow_nan=False)`` accepts.

    Example:
        >>> encode_value({"scores": (1, float("nan")), "raw": b"hi"})
        {'scores': {'$tuple': [1, {'$float': 'nan'}]}, 'raw': {'$bytes': 'aGk='}}
    """
    if value is None or isinstance(value, (bool, str)):
        return str(value) if isinstance(value, str) and type(value) is not str else value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
    if isinstance(value, list):
        return [encode_value(v, notes, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v, notes, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode_value(v, notes, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            "$dict": [
                [encode_value(k, notes, where), encode_value(v, notes, f"{where}[{k!r}]")] for k, v in value.items()
            ]
        }
    if isinstance(value, (set, frozenset)):
        tag = "$set" if isinstance(value, set) else "$frozenset"
        return {tag: [encode_value(v, notes, where) for v in sorted(value, key=repr)]}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, complex):
        return {"$complex": [encode_value(value.real), encode_value(value.imag)]}
    numpy = sys.modules.get("numpy")  # only an array can be one, and then numpy is loaded
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            if value.dtype.kind in "biufcUS":
                data = encode_value(value.tolist(), notes, where)
                return {"$ndarray": {"dtype": value.dtype.str, "shape": list(value.shape), "data": data}}
        elif isinstance(value, numpy.generic):
            return encode_value(value.item(), notes, where)
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if notes is not None:
        notes.append(f"{where} ({kind}) was stored as its repr and loads back as that string")
    return {"$repr": repr(value), "$type": kind}


def decode_value(data: Any) -> Any:
    """The value :func:`encode_value` encoded (a ``$repr`` comes back as its string).

    Raises:
        RecordError: ``data`` holds an unknown ``$`` tag.

    Example:
        >>> decode_value({"$tuple": [1, {"$float": "inf"}]})
        (1, inf)
    """
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = next((k for k in data if k.startswith("$")), None)
    if tag is None:
        return {k: decode_value(v) for k, v in data.items()}
    body = data[tag]
    if tag == "$float":
        return float(body)
    if tag == "$tuple":
        return tuple(decode_value(v) for v in body)
    if tag == "$dict":
        return {decode_value(k): decode_value(v) for k, v in body}
    if tag in ("$set", "$frozenset"):
        items = (decode_value(v) for v in body)
        return set(items) if tag == "$set" else frozenset(items)
    if tag == "$bytes":
        return base64.b64decode(body)
    if tag == "$complex":
        return complex(decode_value(body[0]), decode_value(body[1]))
    if tag == "$ndarray":
        return _array(body)
    if tag in ("$repr", "$type"):
        return data["$repr"]
    raise RecordError(f"Unknown tag {tag!r} in a record; it was written by a newer crystallize. Upgrade it.")


def _array(body: Mapping[str, Any]) -> Any:
    values = decode_value(body["data"])
    try:
        import numpy
    except ImportError:  # the values stay readable as nested lists
        return values
    return numpy.array(values, dtype=numpy.dtype(body["dtype"])).reshape(body["shape"])


# -- runs --------------------------------------------------------------------------


def run_to_record(run: RunResult, *, notes: list[str] | None = None) -> dict[str, Any]:
    """One run as a JSON-safe dict (an example is in the module doc).

    Artifacts are included as base64 bytes; the driver's ArtifactPlugin is what
    writes them as files.

    Args:
        run: the run's result.
        notes: when given, collects a message per value stored as its ``repr``.

    Returns:
        A dict of JSON types; :func:`run_from_record` turns it back into ``run``.

    Example:
        >>> record = run_to_record(RunResult(0, "baseline", metrics={"x": [1.5]}))
        >>> record["metrics"], run_from_record(record) == RunResult(0, "baseline", {"x": [1.5]})
        ({'x': [1.5]}, True)
    """
    where = f"replicate {run.replicate}, condition {run.condition!r}"
    return {
        "record": RECORD_VERSION,
        "replicate": run.replicate,
        "condition": run.condition,
        "seed": encode_value(run.seed, notes, f"seed of {where}"),
        "seconds": encode_value(run.seconds),
        "attempts": run.attempts,
        "metrics": {
            name: encode_value(list(values), notes, f"metric {name!r} of {where}")
            for name, values in run.metrics.items()
        },
        "error": None if run.error is None else {f: getattr(run.error, f) for f in _ERROR_FIELDS},
        "provenance": [_step_to_record(step, notes, f"step {i} of {where}") for i, step in enumerate(run.provenance)],
        "artifacts": [{"name": a.name, "base64": base64.b64encode(a.data).decode("ascii")} for a in run.artifacts],
        "artifact_errors": list(run.artifact_errors),
    }


def run_from_record(record: Mapping[str, Any]) -> RunResult:
    """The :class:`~crystallize.RunResult` a :func:`run_to_record` dict describes.

    Raises:
        RecordError: the record is of a newer format or misses a field.
    """
    version = record.get("record")
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise RecordError(
            f"A run record has format {version!r}; this crystallize reads format "
            f"{RECORD_VERSION} and older. Upgrade crystallize to read it."
        )
    try:
        error = record["error"]
        return RunResult(
            replicate=record["replicate"],
            condition=record["condition"],
            metrics={name: decode_value(values) for name, values in record["metrics"].items()},
            seed=decode_value(record["seed"]),
            provenance=[_step_from_record(step) for step in record["provenance"]],
            artifacts=[ArtifactRecord(a["name"], base64.b64decode(a["base64"])) for a in record["artifacts"]],
            error=None if error is None else RunError(**{f: error[f] for f in _ERROR_FIELDS if f in error}),
            seconds=decode_value(record["seconds"]),
            attempts=record["attempts"],
            artifact_errors=list(record["artifact_errors"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(
            f"A run record is incomplete or damaged ({type(exc).__name__}: {exc}): {str(dict(record))[:200]}"
        ) from exc


def _step_to_record(step: Any, notes: list[str] | None, where: str) -> dict[str, Any]:
    if not isinstance(step, StepRecord):
        return {"$value": encode_value(step, notes, where)}
    out = {f: getattr(step, f) for f in _STEP_FIELDS}
    out["params"] = encode_value(step.params, notes, f"params of {where}")
    out["reads"] = encode_value(list(step.reads), notes, f"reads of {where}")
    out["added"] = encode_value(list(step.added), notes, f"added of {where}")
    out["seconds"] = encode_value(step.seconds)
    return out


def _step_from_record(data: Mapping[str, Any]) -> Any:
    if "$value" in data:
        return decode_value(data["$value"])
    values = {f: data[f] for f in _STEP_FIELDS if f in data}
    values["params"] = decode_value(values.get("params", {}))
    values["reads"] = tuple(decode_value(values.get("reads", [])))
    values["added"] = tuple(decode_value(values.get("added", [])))
    values["seconds"] = decode_value(values.get("seconds", 0.0))
    return StepRecord(**values)


# -- one run as a line of JSON (the journal's hot path) ----------------------------


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


# -- hypotheses --------------------------------------------------------------------


def hypothesis_to_record(result: HypothesisResult, *, notes: list[str] | None = None) -> dict[str, Any]:
    """One hypothesis result as a JSON-safe dict.

    Example:
        >>> h = HypothesisResult("h", ["x"], results={"t": {"p_value": 0.01}}, ranking=["t"])
        >>> hypothesis_from_record(hypothesis_to_record(h)) == h
        True
    """
    where = f"hypothesis {result.name!r}"
    return {
        "name": result.name,
        "metrics": list(result.metrics),
        "results": encode_value(result.results, notes, f"results of {where}"),
        "errors": dict(result.errors),
        "ranking": list(result.ranking),
        "scores": encode_value(result.scores, notes, f"scores of {where}"),
    }


def hypothesis_from_record(record: Mapping[str, Any]) -> HypothesisResult:
    """The :class:`~crystallize.HypothesisResult` a :func:`hypothesis_to_record` dict describes.

    Raises:
        RecordError: a field is missing.
    """
    try:
        return HypothesisResult(
            name=record["name"],
            metrics=list(record["metrics"]),
            results=decode_value(record["results"]),
            errors=dict(record["errors"]),
            ranking=list(record["ranking"]),
            scores=decode_value(record["scores"]),
        )
    except (KeyError, TypeError) as exc:
        raise RecordError(f"A hypothesis record is incomplete ({type(exc).__name__}: {exc}).") from exc
