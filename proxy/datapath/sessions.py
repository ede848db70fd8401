"""Session pins: session id → the backend that served its first request, for a sliding TTL.

Rules: bounded (least recently used out first), so a flood of sessions cannot grow memory
without end; each hit slides the TTL; with `state.backend: redis` the pins live in Redis so
every replica honours the same ones (a local LRU answers first, Redis fills misses).
Session ids are never logged nor put in metric labels.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.tasks import Tasks

log = logging.getLogger("rollout_proxy")


class Pins:
    """In-memory pins: an LRU of (backend, expiry on the monotonic clock)."""

    def __init__(self, ttl_s: float, max_size: int, monotonic: Callable[[], float]) -> None:
        self.ttl_s, self.max_size, self.monotonic = ttl_s, max_size, monotonic
        self.entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    async def get(self, session: str) -> str | None:
        return self.lookup(session)

    def lookup(self, session: str) -> str | None:
        entry = self.entries.get(session)
        if entry is None:
            return None
        now = self.monotonic()
        if entry[1] <= now:
            del self.entries[session]
            return None
        self.entries[session] = (entry[0], now + self.ttl_s)
        self.entries.move_to_end(session)
        return entry[0]

    def pin(self, session: str, backend: str) -> None:
        self.entries[session] = (backend, self.monotonic() + self.ttl_s)
        self.entries.move_to_end(session)
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)

    async def close(self) -> None:
        return None


class RedisPins(Pins):
    """Pins shared by replicas: SET with EX (sliding on each hit), a local LRU in front."""

    def __init__(self, client: aioredis.Redis, ttl_s: float, max_size: int,
                 monotonic: Callable[[], float], prefix: str = "rollout:pin:") -> None:
        super().__init__(ttl_s, max_size, monotonic)
        self.client, self.prefix = client, prefix
        self.tasks = Tasks()
        self.failures = 0

    async def get(self, session: str) -> str | None:
        try:  # Redis is the truth: another replica may have re-pinned the session
            raw = await self.client.getex(self.prefix + session, ex=max(1, int(self.ttl_s)))
        except (RedisError, OSError):
            self._failed()
            return self.lookup(session)  # Redis down: what this replica last knew
        if raw is None:
            self.entries.pop(session, None)
            return None
        backend = raw.decode() if isinstance(raw, bytes) else str(raw)
        super().pin(session, backend)
        return backend

    def pin(self, session: str, backend: str) -> None:
        super().pin(session, backend)
        self.tasks.spawn(self._store(session, backend), name="pin-store")

    async def _store(self, session: str, backend: str) -> None:
        try:
            await self.client.set(self.prefix + session, backend, ex=max(1, int(self.ttl_s)))
        except (RedisError, OSError):
            self._failed()

    def _failed(self) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning(json.dumps({"event": "pin_store_unreachable",
                                    "failures": self.failures}))

    async def close(self) -> None:
        await self.tasks.wait(1.0)
