"""A result as one long table: a row per (run, metric, value index), parameters as columns.

``Result.to_dataframe()`` builds it in memory; ``Result.save`` writes it as
``runs.parquet`` (pandas + pyarrow) or ``runs.csv`` (standard library), the file a
data scientist opens directly. Columns:

``replicate, condition, seed, metric, index, value, error``, then one column per key
a mapping treatment sets (e.g. ``C``), holding each condition's value of that key:
the treatment's, else the ``initial_ctx`` value (the baseline's), else empty. Rows
of a function treatment (``Treatment("t", fn)``) hold empty values: what ``fn``
sets is not known. A key spelt like a fixed column becomes ``param_<key>``.

In the file, ``value`` holds numbers only (booleans as 1/0) and a ``value_text``
column, after ``value``, holds every other value as text (a string as itself, other
values as JSON), so both columns have one type.
"""

from __future__ import annotations

import csv
import json
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .records import encode_value
from .run_result import RunResult

__all__ = ["COLUMNS", "columns_of", "file_columns", "rows", "treatment_params", "write_csv", "write_parquet"]

#: The fixed columns of the in-memory table, in order; parameter columns follow.
COLUMNS = ("replicate", "condition", "seed", "metric", "index", "value", "error")
_FILE_FIXED = ("replicate", "condition", "seed", "metric", "index", "value", "value_text", "error")


def treatment_params(
    treatments: Iterable[Any], initial_ctx: Mapping[str, Any], baseline: str = "baseline"
) -> dict[str, dict[str, Any]]:
    """Condition -> its value of every key that some mapping treatment sets.

    Args:
        treatments: the experiment's treatments (those without a mapping are left out).
        initial_ctx: the baseline's configuration.
        baseline: the baseline condition's name.

    Returns:
        ``{condition: {key: value}}`` for the baseline and each mapping treatment; a key
        a treatment does not set takes its ``initial_ctx`` value, or ``None``.

    Example:
        >>> from crystallize import Treatment
        >>> treatment_params([Treatment("C=10", {"C": 10.0})], {"C": 1.0})
        {'baseline': {'C': 1.0}, 'C=10': {'C': 10.0}}
    """
    mapped = [(t.name, dict(t.mapping)) for t in treatments if getattr(t, "mapping", None) is not None]
    keys = list(dict.fromkeys(k for _, mapping in mapped for k in mapping))
    out = {baseline: {k: initial_ctx.get(k) for k in keys}}
    for name, mapping in mapped:
        out[name] = {k: mapping[k] if k in mapping else initial_ctx.get(k) for k in keys}
    return out


def columns_of(params: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(column, key)`` per parameter key, first-seen order; clashes get ``param_``.

    Example:
        >>> columns_of({"baseline": {"lr": 0.1, "value": 2}})
        [('lr', 'lr'), ('param_value', 'value')]
    """
    used = set(_FILE_FIXED)
    out = []
    for key in dict.fromkeys(k for values in params.values() for k in values):
        column = key
        while column in used:
            column = f"param_{column}"
        used.add(column)
        out.append((column, key))
    return out


def rows(runs: Iterable[RunResult], params: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows as dicts of Python values; a run without metrics has one row.

    Example:
        >>> rows([RunResult(0, "baseline", {"x": [1, 2]})], {})[1]["value"]
        2
    """
    extra = columns_of(params)
    out = []
    for run in runs:
        condition = params.get(run.condition, {})
        base = {
            "replicate": run.replicate,
            "condition": run.condition,
            "seed": run.seed,
            "error": None if run.error is None else str(run.error),
        }
        base.update({column: condition.get(key) for column, key in extra})
        if not run.metrics:
            out.append({**base, "metric": None, "index": None, "value": None})
        for metric, values in run.metrics.items():
            for i, value in enumerate(values):
                out.append({**base, "metric": metric, "index": i, "value": value})
    return out


def file_columns(params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The columns of ``runs.parquet`` / ``runs.csv``, in order."""
    return [*_FILE_FIXED, *(column for column, _ in columns_of(params))]


def _file_rows(
    runs: Iterable[RunResult], params: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows with one type per column: numbers in ``value``, the rest in ``value_text``."""
    table = rows(runs, params)
    for row in table:
        value = row["value"]
        row["value"] = _number(value)
        row["value_text"] = None if row["value"] is not None or value is None else _text(value)
    for column, _ in columns_of(params):
        kind = _kind(r[column] for r in table)
        convert = {"number": _number, "text": _text}.get(kind)
        if convert is not None:
            for row in table:
                if row[column] is not None:
                    row[column] = convert(row[column])
    return file_columns(params), table


def _kind(values: Iterable[Any]) -> str:
    """``"bool"``, ``"str"``, ``"number"`` or ``"text"`` (mixed or other kinds) of the non-None values."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if all(isinstance(v, str) for v in present):
        return "str"
    if all(_number(v) is not None and not isinstance(v, bool) for v in present):
        return "number"
    return "text"


def write_parquet(path: Path, runs: Iterable[RunResult], params: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the table as Parquet.

    Raises:
        ImportError: pandas or pyarrow is missing (``pip install 'crystallize-lab[parquet]'``).
    """
    try:
        import pandas  # type: ignore[import-untyped]
        import pyarrow  # type: ignore[import-untyped]  # noqa: F401 -- pandas needs it for Parquet
    except ImportError as exc:
        raise ImportError(
            "Saving results as Parquet needs pandas and pyarrow: "
            "pip install 'crystallize-lab[parquet]' (or save with table='csv')."
        ) from exc
    columns, table = _file_rows(runs, params)
    data = {}
    for column in columns:
        values = [row[column] for row in table]
        data[column] = pandas.array(values, dtype=_dtype(column, values))
    frame = pandas.DataFrame(data, columns=columns)
    frame.to_parquet(path, index=False)


def _dtype(column: str, values: list[Any]) -> str | None:
    """A pandas dtype that keeps integers integers and missing values missing."""
    present = [v for v in values if v is not None]
    if column in ("seed", "index") or (present and all(type(v) is int for v in present)):
        return "Int64"
    if present and all(isinstance(v, bool) for v in present):
        return "boolean"
    if column == "value" or (present and all(type(v) in (int, float) for v in present)):
        return "float64"
    return None


def write_csv(path: Path, runs: Iterable[RunResult], params: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the table as CSV (UTF-8, a header row, empty cells for missing values)."""
    columns, table = _file_rows(runs, params)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


def _number(value: Any) -> int | float | None:
    """``value`` as a Python number when it is a real number (numpy's included), else None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return int(bool(value))
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(encode_value(value), ensure_ascii=False, allow_nan=False)
