"""Fire-and-forget mirroring to next_gen, and the comparison of its answer with legacy's.

Rules:
1. The client's answer never waits for a mirror, never changes because of one, and never
   fails because of one.
2. At most `shadow.max_in_flight` mirrors run at once; past that a mirror is dropped and
   counted (reason "overload"), never queued.
3. Mirrors use their own pool and timeout, so a stalled next_gen cannot take the primary
   path's connections.
4. On shutdown running mirrors get a short grace, then are cancelled and counted ("shutdown").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.compare import compare
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.observe import Measurement, Tee, measure, wants_body
from proxy.tasks import Tasks
from proxy.trace import TraceWriter
from proxy.upstream import Pool, UpstreamError, read_error, send

SHADOW_HEADER = ("X-Rollout-Shadow", "1")


class Shadow:
    def __init__(self, config: Config, pool: Pool, metrics: Metrics, trace: TraceWriter | None,
                 record: Callable[[str, Measurement], None]) -> None:
        self.config, self.pool, self.metrics, self.trace = config, pool, metrics, trace
        self.record = record  # feeds the guards' windows
        self.tasks = Tasks()
        self.in_flight = 0
        self.closing = False

    def mirror(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None,
               rid: str) -> asyncio.Future[Any] | None:
        """Start a mirror; the returned future is to be given the primary's measurement."""
        if self.closing:
            self.metrics.shadow_dropped.labels("shutdown").inc()
            return None
        if self.in_flight >= self.config.shadow.max_in_flight:
            self.metrics.shadow_dropped.labels("overload").inc()
            return None
        primary: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        copy = CIMultiDict(headers)
        copy[SHADOW_HEADER[0]] = SHADOW_HEADER[1]
        self.in_flight += 1
        self.metrics.shadow_in_flight.inc()
        self.tasks.spawn(self.run(method, path_qs, copy, body, rid, primary), name="mirror")
        return primary

    async def run(self, method: str, path_qs: str, headers: CIMultiDict[str],
                  body: bytes | None, rid: str, primary: asyncio.Future[Any]) -> None:
        config = self.config
        try:
            seen, document = await self.send(method, path_qs, headers, body)
            self.metrics.answered("next_gen", "shadow", seen.status, seen.time_ms / 1000,
                                  seen.tokens, seen.memory_mb)
            self.record("next_gen", seen)
            async with asyncio.timeout(config.backends["legacy"].timeout_s + 5):
                old, old_document = await primary
            comparison = compare(old, old_document, seen, document,
                                 frozenset(config.shadow.ignore))
            self.metrics.comparisons.labels(comparison.result).inc()
            if self.trace is not None:
                self.trace.write({
                    "execution_id": rid,
                    "ts": datetime.now(UTC).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
                    "method": method, "path": path_qs.split("?", 1)[0],
                    "old_system": old.trace_fields(), "new_system": seen.trace_fields(),
                    "match": comparison.trace_fields(),
                })
        except asyncio.CancelledError:
            self.metrics.shadow_dropped.labels("shutdown").inc()
            raise
        except TimeoutError:
            self.metrics.shadow_dropped.labels("primary_unfinished").inc()
        finally:
            self.in_flight -= 1
            self.metrics.shadow_in_flight.dec()

    async def send(self, method: str, path_qs: str, headers: CIMultiDict[str],
                   body: bytes | None) -> tuple[Measurement, Any]:
        telemetry = self.config.telemetry
        started = time.monotonic()
        try:
            response = await send(self.pool, method, path_qs, headers, body)
        except UpstreamError as exc:
            return Measurement(None, (time.monotonic() - started) * 1000, None, 0, None, False,
                               None, exc.kind), None
        tee = Tee(wants_body(response.headers, telemetry, True), telemetry.json_max_bytes)
        first_byte, error = None, None
        try:
            async for chunk in response.content.iter_any():
                first_byte = first_byte or time.monotonic()
                tee.feed(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = read_error(exc, "next_gen")
        finally:
            response.close() if error else response.release()
        document = tee.json()
        seen = measure(None if error else response.status, response.headers, document,
                       started=started, first_byte=first_byte, ended=time.monotonic(),
                       size=tee.size, telemetry=telemetry, error=error.kind if error else None)
        return seen, document

    async def close(self, grace_s: float) -> None:
        self.closing = True
        await self.tasks.wait(grace_s)
        await self.pool.close()
