"""The cache key and the keyed MAC (AES-GMAC) that every cache entry is signed with.

An entry is only unpickled once its MAC verifies, so whoever can write the cache
directory cannot run code in the next process that reads it; only someone who can
read the key can. The key is, in order:

1. ``$CRYSTALLIZE_CACHE_KEY`` if set and not empty (any string), so a cluster's jobs
   can share one key through their environment;
2. else a per-user secret in ``$XDG_CONFIG_HOME/crystallize/cache.key`` (default
   ``~/.config/crystallize/cache.key``), made with mode 0600 on first use. It lives
   outside every cache directory on purpose: a key stored beside the entries would
   be readable by whoever can forge them.

The file holds a text secret and is read exactly as the variable is, so
``CRYSTALLIZE_CACHE_KEY="$(cat ~/.config/crystallize/cache.key)"`` gives another
machine this user's key.

The MAC is GMAC (AES-GCM authenticating the body as associated data, with a fresh
random 96-bit nonce per entry) from the ``cryptography`` package: with AES-NI and
carry-less multiplication it costs about 50 µs per MB, a few per cent of a 1 MB cache
hit, where HMAC-SHA256 cost about 600 µs (75 % of the hit; see
``benchmarks/bench_cache.py``). A random nonce per entry keeps GMAC's one rule (never
reuse a nonce under one key) far below its bound for any cache.

A MAC may also bind a *context*, e.g. where a manifest is stored
(``"<step hash>/<input hash>"``), so that a valid signed entry copied into another
key's slot does not verify there.

Example:
    >>> key = b"k" * 32
    >>> mac = sign(b"body", key)
    >>> verify(mac, b"body", key), verify(mac, b"bodY", key)
    (True, False)
    >>> mac = sign(b"body", key, context=b"step/input")
    >>> verify(mac, b"body", key, b"step/input"), verify(mac, b"body", key, b"step/other")
    (True, False)
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import CrystallizeError

__all__ = ["KEY_ENV", "MAC_SIZE", "CacheKeyError", "cache_key", "key_from_text", "key_path", "sign", "verify"]

log = logging.getLogger("crystallize.cache")

KEY_ENV = "CRYSTALLIZE_CACHE_KEY"
#: Bytes of MAC in front of every entry body: a 12-byte nonce and a 16-byte GMAC tag.
MAC_SIZE = 28
_NONCE = 12

_ciphers: dict[bytes, AESGCM] = {}  # one AES key schedule per key

_file_keys: dict[Path, bytes] = {}  # a key file is read once per process


class CacheKeyError(CrystallizeError):
    """The per-user cache key file could neither be read nor made."""


def key_from_text(text: str) -> bytes:
    """The MAC key for a secret given as text (the variable's or the file's).

    Tagged, so a secret that is reused elsewhere never yields the same MAC key.

    Example:
        >>> len(key_from_text("correct horse battery staple"))
        32
    """
    return hashlib.sha256(b"crystallize cache key\x00" + text.encode("utf-8")).digest()


def key_path() -> Path:
    """Where this user's key file lives (it need not exist yet)."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config, "crystallize", "cache.key").absolute()


def cache_key() -> bytes:
    """This process's cache key: ``$CRYSTALLIZE_CACHE_KEY``, else the key file's.

    Returns:
        32 bytes to sign and verify entries with.

    Raises:
        CacheKeyError: the key file could not be read or made (the message names it
            and the fix); the ``OSError`` is ``__cause__``.
    """
    text = os.environ.get(KEY_ENV)
    if text:
        return key_from_text(text)
    path = key_path()
    key = _file_keys.get(path)
    if key is None:
        # No lock needed: racing threads read (or publish) the same file, so they
        # store the same key.
        key = _file_keys.setdefault(path, _load_or_create(path))
    return key


def sign(body: bytes | memoryview, key: bytes, context: bytes = b"") -> bytes:
    """The MAC of ``body`` under ``key``: a random nonce and its GMAC tag (:data:`MAC_SIZE` bytes).

    Args:
        body: what to authenticate.
        key: the MAC key.
        context: bound into the MAC with the body (e.g. where an entry is stored), so
            the MAC verifies only with the same context: a signed manifest copied into
            another key's slot does not verify there. Costs a copy of ``body``; meant
            for small bodies.
    """
    nonce = os.urandom(_NONCE)
    return nonce + _cipher(key).encrypt(nonce, b"", _bound(body, context))


def verify(mac: bytes | memoryview, body: bytes | memoryview, key: bytes, context: bytes = b"") -> bool:
    """Whether ``mac`` is ``body``'s MAC under ``key`` and ``context`` (tag checked in constant time)."""
    mac = bytes(mac)
    if len(mac) != MAC_SIZE:
        return False
    try:
        _cipher(key).decrypt(mac[:_NONCE], mac[_NONCE:], _bound(body, context))
    except InvalidTag:
        return False
    return True


def _bound(body: bytes | memoryview, context: bytes) -> bytes | memoryview:
    # Length-prefixed, so (context, body) pairs never collide; no context, no copy.
    return body if not context else len(context).to_bytes(4, "big") + context + bytes(body)


def _cipher(key: bytes) -> AESGCM:
    cipher = _ciphers.get(key)
    if cipher is None:
        cipher = _ciphers.setdefault(key, AESGCM(key))
    return cipher


def _load_or_create(path: Path) -> bytes:
    try:
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            text = _create(path)
        _warn_if_shared(path)
    except OSError as exc:
        raise CacheKeyError(
            f"The cache key file {path} could not be read or created ({exc}); the step "
            f"cache is off. Fix its permissions, point XDG_CONFIG_HOME elsewhere, or set "
            f"{KEY_ENV}."
        ) from exc
    if not text.strip():
        raise CacheKeyError(
            f"The cache key file {path} is empty; the step cache is off. Delete it (a new "
            f"key is made) or set {KEY_ENV}."
        )
    return key_from_text(text.strip())


def _create(path: Path) -> str:
    """Publish a new key file, or read the one another process published first.

    The secret is written whole to a private temporary file and then hard-linked into
    place: ``link`` fails if the name exists, so racing processes agree on one key and
    no reader ever sees a half-written file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won; everyone uses its key
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text("utf-8")


def _warn_if_shared(path: Path) -> None:
    if os.stat(path).st_mode & 0o077:
        log.warning(
            "The cache key file %s is readable by other users, who could forge cache "
            "entries that run code when loaded. Run: chmod 600 %s",
            path,
            path,
        )
