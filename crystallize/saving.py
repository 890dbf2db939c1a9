"""A saved result: one folder, written atomically, that rebuilds the Result exactly.

::

    <folder>/
      result.json    conditions, hypotheses, experiment provenance, treatment parameters,
                     and the count and xxh3-128 digest of runs.jsonl
      runs.jsonl     one run record per line (crystallize.records.run_to_record)
      runs.parquet   the long table (crystallize.table), or runs.csv without pandas/pyarrow

The folder is written under a temporary name beside the target and renamed into place,
so a crash never leaves a half-written result that loads: either the old folder (or
none) is there, or the complete new one. ``runs.jsonl`` is checked against its digest
when loaded. The table is for reading with other tools; loading uses only the JSON files.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import xxhash

from .hypotheses import HypothesisResult
from .records import (
    RecordError,
    decode_value,
    encode_value,
    hypothesis_from_record,
    hypothesis_to_record,
    run_from_record,
    run_to_record,
)
from .run_result import RunResult
from .table import write_csv, write_parquet

__all__ = ["FORMAT", "FORMAT_VERSION", "load_parts", "save_parts"]

log = logging.getLogger("crystallize.saving")

#: ``result.json``'s ``format`` field, and the version of the folder layout.
FORMAT, FORMAT_VERSION = "crystallize-result", 1
_RESULT, _RUNS = "result.json", "runs.jsonl"


def save_parts(
    folder: str | os.PathLike[str],
    *,
    runs: Iterable[RunResult],
    conditions: list[str],
    hypotheses: Iterable[HypothesisResult],
    provenance: Mapping[str, Any],
    treatment_params: Mapping[str, Mapping[str, Any]],
    table: str = "auto",
) -> Path:
    """Write a result's parts as the folder ``folder`` (replacing an earlier save there).

    Args:
        folder: the folder to create; if it exists it must be empty or hold a saved result.
        runs, conditions, hypotheses, provenance, treatment_params: the Result's fields.
        table: ``"parquet"``, ``"csv"``, or ``"auto"`` (Parquet when pandas and
            pyarrow import, else CSV).

    Returns:
        The folder's path.

    Raises:
        FileExistsError: ``folder`` holds files that are not a saved result.
        ImportError: ``table="parquet"`` without pandas/pyarrow.
        ValueError: ``table`` is none of the three.
    """
    if table not in ("auto", "parquet", "csv"):
        raise ValueError(f"table must be 'auto', 'parquet' or 'csv', got {table!r}.")
    target = Path(folder).absolute()
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    runs = list(runs)
    notes: list[str] = []
    lines = "".join(
        json.dumps(run_to_record(r, notes=notes), ensure_ascii=False, allow_nan=False) + "\n" for r in runs
    ).encode("utf-8")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "conditions": list(conditions),
        "runs": {"file": _RUNS, "count": len(runs), "xxh3_128": xxhash.xxh3_128_hexdigest(lines)},
        "hypotheses": [hypothesis_to_record(h, notes=notes) for h in hypotheses],
        "provenance": encode_value(dict(provenance), notes, "result.provenance"),
        "treatment_params": encode_value(dict(treatment_params), notes, "treatment parameters"),
    }
    if notes:
        more = f" and {len(notes) - 3} more" if len(notes) > 3 else ""
        log.warning(
            "Saving to %s: %d value(s) are not JSON data and were stored as their repr, which "
            "loads back as a string: %s%s.",
            target,
            len(notes),
            "; ".join(notes[:3]),
            more,
        )
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        _write(tmp / _RUNS, lines)
        meta["table"] = _write_table(tmp, runs, treatment_params, table)
        _write(tmp / _RESULT, json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_parts(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The Result fields saved in ``folder`` by :func:`save_parts`.

    Returns:
        ``{"runs", "conditions", "hypotheses", "provenance", "treatment_params"}``.

    Raises:
        RecordError: no saved result there, or its files are damaged or of a newer format.
    """
    path = Path(folder)
    try:
        meta = json.loads((path / _RESULT).read_text(encoding="utf-8"))
        data = (path / meta["runs"]["file"]).read_bytes()
    except FileNotFoundError as exc:
        raise RecordError(
            f"No saved result in {str(path)!r}: {exc.filename!r} is missing. Save one "
            f"with result.save(folder); a crashed save leaves no folder, never half of one."
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"{str(path / _RESULT)!r} is damaged ({type(exc).__name__}: {exc}).") from exc
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise RecordError(
            f"{str(path / _RESULT)!r} is format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this crystallize reads {FORMAT!r} up to version "
            f"{FORMAT_VERSION}. Upgrade crystallize to read it."
        )
    if xxhash.xxh3_128_hexdigest(data) != meta["runs"]["xxh3_128"]:
        raise RecordError(
            f"{str(path / meta['runs']['file'])!r} does not match the digest in "
            f"{_RESULT}: it was changed or truncated after saving. Save the result again."
        )
    try:
        records = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
    except ValueError as exc:
        raise RecordError(f"{str(path / meta['runs']['file'])!r} is not JSON lines: {exc}.") from exc
    if len(records) != meta["runs"]["count"]:
        raise RecordError(f"{str(path)!r} should hold {meta['runs']['count']} runs, found {len(records)}.")
    return {
        "runs": [run_from_record(r) for r in records],
        "conditions": list(meta["conditions"]),
        "hypotheses": [hypothesis_from_record(h) for h in meta["hypotheses"]],
        "provenance": decode_value(meta["provenance"]),
        "treatment_params": decode_value(meta["treatment_params"]),
    }


def _check_replaceable(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{str(target)!r} exists and is not a folder; save the result to a new folder.")
    if target.is_dir() and any(target.iterdir()) and not (target / _RESULT).is_file():
        raise FileExistsError(
            f"{str(target)!r} holds files that are not a saved result; nothing was "
            f"replaced. Save to a new or empty folder."
        )


def _write_table(folder: Path, runs: list[RunResult], params: Mapping[str, Mapping[str, Any]], table: str) -> str:
    if table != "csv":
        try:
            write_parquet(folder / "runs.parquet", runs, params)
        except ImportError:
            if table == "parquet":
                raise
        else:
            _fsync(folder / "runs.parquet")
            return "runs.parquet"
    write_csv(folder / "runs.csv", runs, params)
    _fsync(folder / "runs.csv")
    return "runs.csv"


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # folders cannot be synced on some systems
    finally:
        os.close(fd)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an earlier save there is moved aside, then removed."""
    _fsync(tmp)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
