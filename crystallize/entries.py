"""Cache entries as stored: signed manifests that point at content-addressed output blobs.

An entry is a step's output plus what the step recorded (see :class:`CacheEntry`).
It is stored as two kinds of object, a layout made for object storage:

* a **manifest** under ``(<step hash>, <input hash>)``: a small signed frame holding
  what the step recorded, and either the output itself (when its pickle is at most
  :data:`INLINE_MAX` bytes) or a pointer to a blob: the blob's digest, size and MAC;
* a **blob** under ``("blobs", <xxh3-128 of its bytes>)``: the pickled output, so
  equal outputs are stored once.

A manifest frame is ``MAGIC | MAC | body``, and the body is a JSON header (kind, step
name, created, last use, output size, blob digest and MAC: readable without the key
by ``crystallize cache ls``) followed by the pickled record. The MAC (AES-GMAC, see
:mod:`crystallize.signing`) covers the body *and where the manifest is stored*, so a
valid manifest copied into another key's slot does not verify. A blob is checked
against the MAC its manifest carries before it is unpickled; nothing unverified is
ever unpickled.

Example:
    >>> key = b"k" * 32
    >>> frame = encode_entry(CacheEntry(output=42), key, where="step/input")
    >>> decode_entry(frame, key, where="step/input").output
    42
    >>> decode_entry(frame, key, where="step/other")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    crystallize.entries.CorruptEntryError: its MAC does not verify: ... or moved from another key's slot
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import xxhash

from .signing import MAC_SIZE, cache_key, sign, verify

__all__ = [
    "BLOBS",
    "INLINE_MAX",
    "MAGIC",
    "CacheEntry",
    "CorruptEntryError",
    "Manifest",
    "blob_name",
    "decode_entry",
    "encode_entry",
    "make_manifest",
    "OtherFormatError",
    "open_manifest",
    "read_header",
]

# The last byte is the frame version: 2 added a MAC (HMAC-SHA256), 3 made it GMAC,
# 4 made it a manifest bound to its location, with big outputs in blobs. Entries of
# older frames are misses and get rewritten.
MAGIC = b"CRYSTALLIZE-ENTRY\x04"
#: The namespace output blobs live in.
BLOBS = "blobs"
#: Outputs whose pickle is at most this many bytes are kept in the manifest itself.
INLINE_MAX = 64 << 10
_HEADER_LEN = 4


class CorruptEntryError(ValueError):
    """A frame or blob is not whole, not signed with this cache's key for this place,
    or does not unpickle."""


class OtherFormatError(CorruptEntryError):
    """A frame written in another frame version, by another version of crystallize: a
    miss, not damage."""


@dataclass
class CacheEntry:
    """One cached step execution.

    Attributes:
        output: the data the step returned (metrics split off).
        metrics: ``(name, value)`` pairs the step recorded, in order.
        added: ``(key, value)`` pairs the step added to the context.
        reads: ctx key -> digest of the value the step saw (``<absent>`` if missing).
        artifacts: artifacts the step wrote, replayed on a hit.
        random_after: randomness pseudo-read key -> the generator's state after the
            step, restored on a hit (see :mod:`crystallize.randomness`).
    """

    output: Any
    metrics: list[tuple[str, Any]] = field(default_factory=list)
    added: list[tuple[str, Any]] = field(default_factory=list)
    reads: dict[Any, str] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    random_after: dict[Any, Any] = field(default_factory=dict)


class Manifest:
    """A verified manifest: its header and its record.

    Attributes:
        header: ``kind`` (``"entry"`` or ``"record"``), ``step``, ``created``,
            ``used`` (last use, seconds since the epoch), ``size`` (output bytes),
            ``blob`` and ``blob_mac`` (hex; ``None`` when the output is inline).
        record: what the step recorded (``reads``, ``metrics``...), and ``output``
            (the pickled output) when inline.
        payload: the record as stored, so a manifest can be re-signed cheaply.
    """

    __slots__ = ("header", "payload", "record")

    def __init__(self, header: dict[str, Any], record: dict[str, Any], payload: bytes) -> None:
        self.header, self.record, self.payload = header, record, payload

    @property
    def reads(self) -> dict[Any, str]:
        """The digests of what the step read, checked against the current context."""
        return self.record.get("reads", {})

    @property
    def blob(self) -> str | None:
        """The output blob's name, or ``None`` when the output is inline."""
        return self.header.get("blob")

    def entry(self, output_pickle: bytes | memoryview | None = None) -> CacheEntry:
        """The entry, with the output unpickled from the record or from ``output_pickle``.

        Raises:
            CorruptEntryError: the output does not unpickle here.
        """
        fields = {k: v for k, v in self.record.items() if k != "output"}
        data = self.record.get("output") if output_pickle is None else output_pickle
        try:
            return CacheEntry(output=pickle.loads(data), **fields)  # type: ignore[arg-type]
        except Exception as exc:  # signed by us, but by an incompatible version
            raise CorruptEntryError(f"unreadable body: {exc}") from exc

    def check_blob(self, blob: bytes, key: bytes) -> None:
        """Verify an output blob against the MAC and size this manifest carries.

        Raises:
            CorruptEntryError: the blob is not the one this manifest was made with.
        """
        mac = bytes.fromhex(self.header.get("blob_mac") or "")
        if len(blob) != self.header.get("size") or not verify(mac, blob, key):
            raise CorruptEntryError("the output blob does not match its manifest's digest")

    def touched(self, key: bytes, where: str, now: float | None = None) -> bytes:
        """This manifest as a new frame with its last use set to ``now``."""
        header = {**self.header, "used": time.time() if now is None else now}
        return _frame(header, self.payload, key, where)


def blob_name(output_pickle: bytes) -> str:
    """The content address of an output blob: the hex xxh3-128 of its bytes."""
    return xxhash.xxh3_128_hexdigest(output_pickle)


def make_manifest(
    entry: CacheEntry,
    key: bytes,
    where: str,
    *,
    output_pickle: bytes | None = None,
    step: str | None = None,
    kind: str = "entry",
    blob: str | None = None,
) -> bytes:
    """Sign a manifest for ``entry`` stored at ``where`` (``"<namespace>/<key>"``).

    Args:
        entry: what the step recorded (its ``output`` is ignored: see below).
        key: the MAC key.
        where: the manifest's location, bound into its MAC.
        output_pickle: the pickled output; kept inline unless ``blob`` is given.
        step: the step's name, for ``crystallize cache ls``.
        kind: ``"entry"``, or ``"record"`` for the cache's own small records.
        blob: the name of the blob holding ``output_pickle`` (then not inline).

    Raises:
        Exception: whatever pickling the record raises.
    """
    if output_pickle is None:
        output_pickle = cloudpickle.dumps(entry.output, protocol=5)
    record = {k: v for k, v in entry.__dict__.items() if k != "output"}
    now = time.time()
    header: dict[str, Any] = {
        "kind": kind,
        "step": step,
        "created": now,
        "used": now,
        "size": len(output_pickle),
        "blob": blob,
        "blob_mac": None,
    }
    if blob is None:
        record["output"] = output_pickle
    else:
        header["blob_mac"] = sign(output_pickle, key).hex()
    return _frame(header, cloudpickle.dumps(record, protocol=5), key, where)


def open_manifest(frame: bytes, key: bytes, where: str) -> Manifest:
    """Verify a frame stored at ``where``, then unpack it.

    Raises:
        CorruptEntryError: a wrong header; a MAC that does not verify under ``key``
            for ``where`` (damaged, forged, signed with another key, or moved from
            another slot: the body is then never unpickled); or a verified body that
            does not unpickle here.
    """
    head = len(MAGIC)
    if len(frame) > head and frame.startswith(MAGIC[:-1]) and not frame.startswith(MAGIC):
        raise OtherFormatError(
            f"written in cache format {frame[head - 1]} by another version of crystallize; "
            f"this one reads format {MAGIC[-1]}"
        )
    if len(frame) < head + MAC_SIZE + _HEADER_LEN or not frame.startswith(MAGIC):
        raise CorruptEntryError("bad header")
    view = memoryview(frame)
    mac, body = view[head : head + MAC_SIZE], view[head + MAC_SIZE :]
    if not verify(mac, body, key, where.encode()):
        raise CorruptEntryError(
            "its MAC does not verify: damaged, forged, signed with another cache key, or moved from another key's slot"
        )
    try:
        size = int.from_bytes(body[:_HEADER_LEN], "big")
        header = json.loads(bytes(body[_HEADER_LEN : _HEADER_LEN + size]))
        payload = bytes(body[_HEADER_LEN + size :])
        record = pickle.loads(payload)
    except Exception as exc:  # signed by us, but by an incompatible version
        raise CorruptEntryError(f"unreadable body: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(record, dict):
        raise CorruptEntryError("unreadable body: not a manifest")
    return Manifest(header, record, payload)


def read_header(frame: bytes) -> dict[str, Any] | None:
    """A manifest's JSON header, *unverified* (for listings only); ``None`` if not a manifest.

    Only JSON is parsed, never a pickle, so this is safe on any bytes.
    """
    head = len(MAGIC) + MAC_SIZE
    if len(frame) < head + _HEADER_LEN or not frame.startswith(MAGIC):
        return None
    size = int.from_bytes(frame[head : head + _HEADER_LEN], "big")
    try:
        header = json.loads(frame[head + _HEADER_LEN : head + _HEADER_LEN + size])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def encode_entry(entry: CacheEntry, key: bytes | None = None, *, where: str = "") -> bytes:
    """A manifest frame holding all of ``entry`` (output inline), for location ``where``.

    Raises:
        Exception: whatever pickling the entry raises.
    """
    return make_manifest(entry, cache_key() if key is None else key, where)


def decode_entry(frame: bytes, key: bytes | None = None, *, where: str = "") -> CacheEntry:
    """Verify and unpack a frame whose output is inline (see :func:`encode_entry`).

    Args:
        frame: the stored bytes.
        key: the MAC key; ``None`` for this process's cache key.
        where: the location it was stored at (``"<step hash>/<input hash>"``).

    Raises:
        CorruptEntryError: see :func:`open_manifest`; also when the output is in a blob.
    """
    manifest = open_manifest(frame, cache_key() if key is None else key, where)
    if manifest.blob is not None:
        raise CorruptEntryError(f"the output is in blob {manifest.blob}, not in this frame")
    return manifest.entry()


def _frame(header: dict[str, Any], payload: bytes, key: bytes, where: str) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    body = len(text).to_bytes(_HEADER_LEN, "big") + text + payload
    return MAGIC + sign(body, key, where.encode()) + body
