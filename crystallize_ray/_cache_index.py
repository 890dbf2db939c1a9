"""The in-cluster cache tier's index: a named Ray actor (see :mod:`crystallize_ray.cache_tier`).

It maps names (``<durable store>|<namespace>/<key>``) to stored objects, bounded in
bytes with the least recently used forgotten first, and holds the cluster's
single-flight leases. Small objects live in the actor; big ones it puts in Ray's
object store itself, so that it owns them: Ray frees an object with its owner, and a
worker that handed it over may die any time. It is an async actor, so a worker
waiting for a lease (``wait``) never blocks the others' calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

__all__ = ["INLINE_BYTES", "CacheIndex"]

#: Objects up to this size are kept in the actor itself.
INLINE_BYTES = 100 << 10


class CacheIndex:
    """Objects by name (bounded in bytes, least recently used out first) and leases.

    Args:
        max_bytes: the most bytes of objects kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.objects: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.max_bytes = max_bytes
        self.leases: dict[str, tuple[str, float]] = {}
        self.changed: dict[str, asyncio.Event] = {}

    async def get(self, name: str) -> Any:
        item = self.objects.get(name)
        if item is None:
            return None
        self.objects.move_to_end(name)
        return item[0]

    async def has(self, name: str) -> bool:
        return name in self.objects

    async def put(self, name: str, blob: bytes, only_new: bool) -> bool:
        if only_new and name in self.objects:
            return False
        await self.forget(name)
        size = len(blob)
        if size > self.max_bytes:
            return True  # kept by the durable store only
        # A big object goes to the object store, put here so that the index owns it.
        value = ("bytes", blob) if size <= INLINE_BYTES else ("ref", [ray_put(blob)])
        self.objects[name] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self.objects.popitem(last=False)
            self.bytes -= dropped
        self._notify(name)
        return True

    async def forget(self, name: str) -> None:
        item = self.objects.pop(name, None)
        if item is not None:
            self.bytes -= item[1]

    async def acquire(self, name: str, token: str, ttl: float) -> bool:
        now = time.time()
        current = self.leases.get(name)
        if current is not None and current[1] > now and current[0] != token:
            return False
        self.leases[name] = (token, now + ttl)
        return True

    async def renew(self, name: str, token: str, ttl: float) -> None:
        if self.leases.get(name, ("",))[0] == token:
            self.leases[name] = (token, time.time() + ttl)

    async def release(self, name: str, token: str) -> None:
        if self.leases.get(name, ("",))[0] == token:
            del self.leases[name]
            self._notify(name)

    async def held(self, name: str, token: str | None) -> bool:
        current = self.leases.get(name)
        return current is not None and current[1] > time.time() and current[0] != token

    async def wait(self, name: str, seconds: float) -> None:
        current = self.leases.get(name)
        left = 0.0 if current is None else min(seconds, current[1] - time.time())
        if left <= 0:
            return
        event = self.changed.setdefault(name, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout=left)
        except TimeoutError:
            pass

    async def stats(self) -> dict[str, int]:
        return {"objects": len(self.objects), "bytes": self.bytes, "leases": len(self.leases)}

    def _notify(self, name: str) -> None:
        event = self.changed.pop(name, None)
        if event is not None:
            event.set()


def ray_put(blob: bytes) -> Any:
    """Put ``blob`` in Ray's object store, owned by this process (the index actor)."""
    import ray

    return ray.put(blob)
