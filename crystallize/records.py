"""The record format: a run, a hypothesis result or any value as JSON-safe data.

One encoding, shared by everything that writes results down: ``Result.save`` writes
one :func:`run_to_record` per line of ``runs.jsonl``, and the run journal appends the
same records as runs finish (:func:`crystallize.record_json.run_to_json` writes their
text directly).
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
