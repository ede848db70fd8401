"""Rollout state shared by several replicas through Redis.

Rules:
1. The state is one JSON value under `rollout:state`; every save also PUBLISHes on
   `rollout:state:changed`, so other replicas adopt it at once; a re-read every second is the
   safety net for a missed message.
2. Redis down never stops traffic: replicas serve with the last known state, say so in
   /readyz and `rollout_state_store_up`, and catch up when it returns. A change made while
   Redis was down is written when it returns (the last writer wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.state.store import Stored
from proxy.tasks import Tasks
from proxy.telemetry.metrics import Metrics

log = logging.getLogger("rollout_proxy")
KEY = "rollout:state"
CHANNEL = "rollout:state:changed"
RESYNC_S = 1.0


class RedisStore:
    def __init__(self, url: str, metrics: Metrics, *, key: str = KEY,
                 channel: str = CHANNEL) -> None:
        self.client: aioredis.Redis = aioredis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=5)
        self.metrics, self.key, self.channel = metrics, key, channel
        self.tasks = Tasks()
        self.last = Stored()
        self.pending: Stored | None = None
        self.dirty = False  # a local change Redis has not seen yet
        self.up = False
        self.wake = asyncio.Event()

    # The Store protocol (synchronous: the last known state, writes in the background) ------

    def load(self) -> Stored:
        return self.last

    def save(self, stored: Stored) -> None:
        self.last, self.dirty = stored, True
        self.wake.set()

    def locked(self) -> contextlib.AbstractContextManager[None]:
        # Replicas change the shared document last-writer-wins; a change is one key's SET.
        return contextlib.nullcontext()

    def poll(self) -> Stored | None:
        pending, self.pending = self.pending, None
        return pending

    # The background side --------------------------------------------------------------------

    async def start(self) -> None:
        """Read the shared state once (briefly), then keep in step in the background."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.resync()
        self.tasks.spawn(self.writer(), name="redis-writer")
        self.tasks.spawn(self.listener(), name="redis-listener")

    async def close(self) -> None:
        if self.dirty:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self.write()
        await self.tasks.wait(0)
        await self.client.aclose()

    def mark(self, up: bool) -> None:
        if up != self.up:
            log.warning(json.dumps({"event": "state_store", "backend": "redis",
                                    "up": up}))
        self.up = up
        self.metrics.state_store_up.set(1 if up else 0)

    async def resync(self) -> None:
        try:
            if self.dirty:
                await self.write()
                return
            raw = await self.client.get(self.key)
        except (RedisError, OSError):
            self.mark(False)
            return
        self.mark(True)
        if raw is None:
            return
        try:
            fresh = Stored.from_json(json.loads(raw))
        except (ValueError, TypeError):
            log.error(json.dumps({"event": "state_unreadable", "key": self.key}))
            return
        if fresh != self.last:
            self.last = self.pending = fresh

    async def write(self) -> None:
        sent = self.last
        document = json.dumps(sent.to_json())
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.key, document)
            pipe.publish(self.channel, document)
            await pipe.execute()
        self.dirty = self.last is not sent  # a save made during the await still has to go out
        self.mark(True)

    async def writer(self) -> None:
        """Write local changes at once; otherwise re-read every RESYNC_S (the safety net)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESYNC_S):
                    await self.wake.wait()
            self.wake.clear()
            await self.resync()

    async def listener(self) -> None:
        while True:
            try:
                await self.listen()
            except (RedisError, OSError):
                self.mark(False)
            await asyncio.sleep(RESYNC_S)

    async def listen(self) -> None:
        async with self.client.pubsub() as pubsub:
            await pubsub.subscribe(self.channel)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=RESYNC_S)
                if message is not None and message.get("type") == "message":
                    self.adopt(message.get("data"))

    def adopt(self, raw: Any) -> None:
        if self.dirty:
            return  # our own unsent change wins; it goes out on the next write
        try:
            fresh = Stored.from_json(json.loads(raw))
        except (ValueError, TypeError):
            return
        if fresh != self.last:
            self.last = self.pending = fresh
