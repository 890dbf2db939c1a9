"""``crystallize cache``: list, measure, verify and trim a step cache, on a directory or a URL.

Every command takes ``--cache`` (a directory, or a URL such as ``s3://bucket/prefix``);
without it the cache is found as the library finds it: ``$CRYSTALLIZE_CACHE_URL``,
else ``$CRYSTALLIZE_CACHE_DIR``, else ``./.cache``. A URL is worked on directly, not
through this machine's local copy.

* ``ls``: entries per step (how many, bytes, last use);
* ``du``: bytes by kind (manifests, blobs, records, leases; blobs no manifest uses);
* ``verify [--repair]``: every manifest's signature and every blob's digest;
  ``--repair`` deletes what is bad (the next run recomputes it);
* ``gc --older-than 7d --max-size 10G``: drop entries unused for that long, then the
  least recently used until the cache fits, then blobs nothing points at and lapsed
  leases;
* ``clear``: delete everything.

``ls`` and ``du`` read the manifests' JSON headers only (no key needed, nothing
unpickled); ``verify`` needs the cache key (see :mod:`crystallize.signing`).

Example:
    $ crystallize cache ls --cache s3://my-bucket/cache
    $ python -m crystallize cache gc --older-than 30d --max-size 50G
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click

from .entries import BLOBS, CorruptEntryError, open_manifest, read_header
from .stores import (
    LocalCacheStore,
    ReadThroughStore,
    StoredObject,
    open_store,
    parse_size,
)

__all__ = ["Inventory", "cache", "parse_age"]

_LEASE = ".lease"
#: gc leaves blobs and leases younger than this alone: a writer may be between its
#: blob and its manifest.
GRACE_SECONDS = 3600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """Seconds in an age such as ``"7d"``, ``"12h"``, ``"30m"``, ``"2w"`` or ``"90"``.

    Example:
        >>> parse_age("7d"), parse_age("1.5h"), parse_age("90")
        (604800.0, 5400.0, 90.0)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text, re.IGNORECASE)
    if not match:
        raise click.BadParameter(f"{text!r} is not an age; write e.g. 7d, 12h, 30m or 2w.")
    return float(match.group(1)) * _UNITS[match.group(2).lower() or "s"]


@dataclass
class Entry:
    """One manifest: where it is, its unverified header, and its size."""

    obj: StoredObject
    header: dict[str, Any] | None

    @property
    def used(self) -> float:
        return float((self.header or {}).get("used") or self.obj.modified)


@dataclass
class Inventory:
    """Everything a store holds, sorted by kind (one listing, one read per manifest)."""

    entries: list[Entry] = field(default_factory=list)
    records: list[Entry] = field(default_factory=list)
    blobs: dict[str, StoredObject] = field(default_factory=dict)
    leases: list[StoredObject] = field(default_factory=list)
    unknown: list[StoredObject] = field(default_factory=list)

    @classmethod
    def of(cls, store: Any) -> Inventory:
        found = cls()
        manifests = []
        for obj in store.walk():
            if obj.namespace == BLOBS:
                found.blobs[obj.key] = obj
            elif obj.key.endswith(_LEASE):
                found.leases.append(obj)
            else:
                manifests.append(obj)
        with ThreadPoolExecutor(16) as pool:  # object stores answer faster in parallel
            frames = pool.map(lambda o: store.get(o.namespace, o.key), manifests)
            for obj, frame in zip(manifests, frames):
                header = None if frame is None else read_header(frame)
                kind = (header or {}).get("kind")
                target = found.entries if kind == "entry" else found.records if kind == "record" else found.unknown
                target.append(Entry(obj, header) if kind else obj)  # type: ignore[arg-type]
        return found

    def blob_of(self, entry: Entry) -> StoredObject | None:
        name = (entry.header or {}).get("blob")
        return self.blobs.get(name) if name else None

    def orphans(self, keep: Iterable[Entry]) -> list[StoredObject]:
        used = {(e.header or {}).get("blob") for e in keep}
        return [b for name, b in self.blobs.items() if name not in used]


def _durable(spec: str | None) -> Any:
    store = open_store(spec)
    if isinstance(store, ReadThroughStore):  # work on the remote, not this machine's copy
        store = store.remote
    if not callable(getattr(store, "walk", None)):
        raise click.UsageError(f"{store!r} cannot list its objects.")
    return store


cache_option = click.option(
    "--cache",
    "spec",
    metavar="DIR_OR_URL",
    default=None,
    help="The cache: a directory or a URL (s3://bucket/prefix). Default: $CRYSTALLIZE_CACHE_URL, "
    "else $CRYSTALLIZE_CACHE_DIR, else ./.cache.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group("cache")
def cache() -> None:
    """Inspect and manage a step cache (a directory or an object-store URL)."""


@cache.command("ls")
@cache_option
@json_option
def ls(spec: str | None, as_json: bool) -> None:
    """Entries per step: how many, their bytes, and when one was last used."""
    store = _durable(spec)
    inv = Inventory.of(store)
    steps: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"versions": set(), "entries": 0, "bytes": 0, "blobs": set(), "last_use": 0.0}
    )
    for entry in inv.entries:
        row = steps[(entry.header or {}).get("step") or "?"]
        row["versions"].add(entry.obj.namespace)
        row["entries"] += 1
        row["bytes"] += entry.obj.size
        blob = inv.blob_of(entry)
        if blob is not None and blob.key not in row["blobs"]:  # equal outputs are stored once
            row["blobs"].add(blob.key)
            row["bytes"] += blob.size
        row["last_use"] = max(row["last_use"], entry.used)
    rows = [
        {"step": name, **{k: v for k, v in row.items() if k != "blobs"}, "versions": len(row["versions"])}
        for name, row in steps.items()
    ]
    rows.sort(key=lambda r: -r["last_use"])
    if as_json:
        click.echo(json.dumps({"store": repr(store), "steps": rows}))
        return
    click.echo(f"{store!r}: {len(inv.entries)} entries of {len(rows)} steps")
    _table(
        ["step", "versions", "entries", "bytes", "last use"],
        [[r["step"], r["versions"], r["entries"], _bytes(r["bytes"]), _when(r["last_use"])] for r in rows],
    )


@cache.command("du")
@cache_option
@json_option
def du(spec: str | None, as_json: bool) -> None:
    """Bytes by kind of object, and the blobs that no manifest points at."""
    store = _durable(spec)
    inv = Inventory.of(store)
    orphans = inv.orphans(inv.entries)
    kinds = {
        "manifests": (len(inv.entries), sum(e.obj.size for e in inv.entries)),
        "blobs": (len(inv.blobs), sum(b.size for b in inv.blobs.values())),
        "records": (len(inv.records), sum(e.obj.size for e in inv.records)),
        "leases": (len(inv.leases), sum(o.size for o in inv.leases)),
        "other": (len(inv.unknown), sum(o.size for o in inv.unknown)),
        "unreferenced blobs": (len(orphans), sum(b.size for b in orphans)),
    }
    total = sum(size for name, (_, size) in kinds.items() if name != "unreferenced blobs")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "store": repr(store),
                    "total": total,
                    "kinds": {k: {"count": c, "bytes": b} for k, (c, b) in kinds.items()},
                }
            )
        )
        return
    click.echo(f"{store!r}: {_bytes(total)}")
    _table(["kind", "count", "bytes"], [[k, c, _bytes(b)] for k, (c, b) in kinds.items()])


@cache.command("verify")
@cache_option
@json_option
@click.option("--repair", is_flag=True, help="Delete bad manifests and blobs (they are recomputed when needed).")
def verify(spec: str | None, as_json: bool, repair: bool) -> None:
    """Check every manifest's signature and every blob's digest (needs the cache key)."""
    from .signing import CacheKeyError, cache_key

    try:
        key = cache_key()
    except CacheKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    store = _durable(spec)
    inv = Inventory.of(store)
    bad: list[dict[str, str]] = []
    checked = 0
    for entry in [*inv.entries, *inv.records, *(Entry(o, None) for o in inv.unknown)]:
        ns, name = entry.obj.namespace, entry.obj.key
        checked += 1
        problem = _check(store, ns, name, key)
        if problem is not None:
            bad.append({"object": f"{ns}/{name}", "problem": problem[0]})
            if repair:
                store.delete(ns, name)
                if problem[1] is not None:
                    store.delete(BLOBS, problem[1])
    if as_json:
        click.echo(json.dumps({"store": repr(store), "checked": checked, "bad": bad, "repaired": repair}))
    else:
        click.echo(f"{store!r}: {checked} manifests checked, {len(bad)} bad" + (" (deleted)" if repair and bad else ""))
        for item in bad:
            click.echo(f"  {item['object']}: {item['problem']}")
    if bad and not repair:
        raise SystemExit(1)


def _check(store: Any, namespace: str, key: str, mac_key: bytes) -> tuple[str, str | None] | None:
    """``None`` if the manifest (and its blob) verify; else ``(problem, bad blob or None)``."""
    frame = store.get(namespace, key)
    if frame is None:
        return None  # deleted meanwhile
    try:
        manifest = open_manifest(frame, mac_key, f"{namespace}/{key}")
    except CorruptEntryError as exc:
        return str(exc), None
    if manifest.blob is None:
        return None
    blob = store.get(BLOBS, manifest.blob)
    if blob is None:
        return f"its output blob {manifest.blob} is missing", None
    try:
        manifest.check_blob(blob, mac_key)
    except CorruptEntryError as exc:
        return f"blob {manifest.blob}: {exc}", manifest.blob
    return None


@cache.command("gc")
@cache_option
@json_option
@click.option("--older-than", "older_than", metavar="AGE", help="Delete entries not used for this long (7d, 12h).")
@click.option(
    "--max-size", "max_size", metavar="SIZE", help="Then delete the least recently used until this fits (10G)."
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
def gc(spec: str | None, as_json: bool, older_than: str | None, max_size: str | None, dry_run: bool) -> None:
    """Drop old and least recently used entries, unreferenced blobs and lapsed leases."""
    store = _durable(spec)
    inv = Inventory.of(store)
    now = time.time()
    cutoff = now - parse_age(older_than) if older_than else None
    limit = parse_size(max_size) if max_size else None
    doomed = [e for e in [*inv.entries, *inv.records] if cutoff is not None and e.used < cutoff]
    gone = {id(e) for e in doomed}
    keep = sorted((e for e in inv.entries if id(e) not in gone), key=lambda e: e.used)
    refs = Counter((e.header or {}).get("blob") for e in keep)
    size = sum(e.obj.size for e in keep) + sum(b.size for n, b in inv.blobs.items() if refs[n])
    while limit is not None and keep and size > limit:  # least recently used first
        entry = keep.pop(0)
        doomed.append(entry)
        size -= entry.obj.size
        name = (entry.header or {}).get("blob")
        refs[name] -= 1
        if name in inv.blobs and refs[name] == 0:
            size -= inv.blobs[name].size
    was_used = {(e.header or {}).get("blob") for e in inv.entries}
    objects = [e.obj for e in doomed]
    # A blob nobody used yet may belong to a manifest being written: it gets a grace.
    objects += [b for b in inv.orphans(keep) if b.key in was_used or b.modified < now - GRACE_SECONDS]
    objects += [o for o in inv.leases if o.modified < now - GRACE_SECONDS]
    freed = sum(o.size for o in objects)
    if not dry_run:
        for obj in objects:
            store.delete(obj.namespace, obj.key)
    entries = sum(1 for e in doomed if e in inv.entries)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "store": repr(store),
                    "deleted_entries": entries,
                    "deleted_objects": len(objects),
                    "freed": freed,
                    "dry_run": dry_run,
                }
            )
        )
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{store!r}: {verb} {entries} entries, {len(objects)} objects in all, {_bytes(freed)}")


@cache.command("clear")
@cache_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear(spec: str | None, yes: bool) -> None:
    """Delete every entry, blob, record and lease in the cache."""
    store = _durable(spec)
    if not yes:
        click.confirm(f"Delete everything in {store!r}?", abort=True)
    objects = list(store.walk())
    for obj in objects:
        store.delete(obj.namespace, obj.key)
    if isinstance(store, LocalCacheStore) and store.root.is_dir():
        for child in store.root.iterdir():  # empty folders, temporary files, lock files
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    click.echo(f"{store!r}: deleted {len(objects)} objects")


def _table(columns: list[str], rows: list[list[Any]]) -> None:
    cells = [columns] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def _when(stamp: float) -> str:
    if not stamp:
        return "-"
    ago = time.time() - stamp
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if ago >= seconds:
            return f"{ago / seconds:.0f}{unit} ago"
    return "just now"
