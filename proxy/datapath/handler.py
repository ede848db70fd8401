"""The client-facing handler: gather facts, ask routing, forward, stream the answer back.

Rules:
1. The live snapshot (config, plan, pools) is read once per request and passed down: a
   reload never changes a request in flight, how it falls back, nor how it is measured.
2. The request body is read once (bounded by limits.max_body_bytes, streamed or not) and
   shared by the primary send, a fallback and a mirror.
3. Once the answer's head has gone to the client, an upstream failure ends the connection:
   the client must see an incomplete answer, never a truncated one passed off as complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import Config, TelemetryConfig, UserIdSource
from proxy.datapath.decide import Decision, Facts, decide
from proxy.datapath.fallback import Answer
from proxy.datapath.headers import (
    REQUEST_ID,
    downstream_headers,
    replacing,
    request_id,
    upstream_headers,
)
from proxy.datapath.live import Live
from proxy.datapath.runtime import Runtime
from proxy.datapath.shadow import UNFINISHED, Pairing, Shadow
from proxy.datapath.upstream import UpstreamError, read_error
from proxy.telemetry.observe import Measurement, Tee, measure_body, measure_tee, no_answer, tee_for

log = logging.getLogger("rollout_proxy")
NO_BODY_STATUS = frozenset({204, 304})
WEBSOCKET_OWN = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                 "Sec-WebSocket-Protocol")
# An answer of known length up to this size whose body came whole with its head (the common
# case) leaves in one write; any other streams, so no byte the proxy has ever waits.
SMALL_BODY = 64 * 1024


class BodyTooLarge(Exception):
    pass


def error_response(status: int, message: str, rid: str, **headers: str) -> web.Response:
    body = json.dumps({"error": message, "request_id": rid})
    response = web.Response(status=status, text=body, content_type="application/json")
    response.headers["X-Request-Id"] = rid
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


async def read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    if not request.body_exists:
        return None
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        # web.Server (unlike an Application's router) does not answer it: the client waits.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def json_fields(request: web.BaseRequest, body: bytes | None) -> dict[str, Any] | None:
    if not body or "json" not in request.headers.get("Content-Type", ""):
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


class Lazy(Mapping[str, Any]):
    """A mapping built on first use: cookies, query and the JSON body are parsed only when
    a user-id source asks for them, not on every request."""

    __slots__ = ("_made", "_make")

    def __init__(self, make: Callable[[], Mapping[str, Any]]) -> None:
        self._make = make
        self._made: Mapping[str, Any] | None = None

    def _mapping(self) -> Mapping[str, Any]:
        if self._made is None:
            self._made = self._make()
        return self._made

    def __getitem__(self, key: str) -> Any:
        return self._mapping()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())


def upstream_target(request: web.BaseRequest) -> str | None:
    """The path and query sent upstream: origin-form as received, absolute-form reduced to
    its path (RFC 9112 3.2.2); CONNECT and '*' are refused, so a client never picks the
    host the proxy connects to."""
    raw = request.raw_path
    if request.method == "CONNECT" or raw == "*":
        return None
    if raw.startswith("/"):
        return raw
    return request.rel_url.raw_path_qs or "/"


def session_id(request: web.BaseRequest, source: UserIdSource | None) -> str | None:
    if source is None:
        return None
    if source.kind == "cookie":
        return request.cookies.get(source.name) or None
    return request.headers.get(source.name) or None


class ProxyHandler:
    def __init__(self, runtime: Runtime, shadow: Shadow) -> None:
        self.rt, self.shadow = runtime, shadow

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        rt = self.rt
        live = rt.live  # this request's snapshot, to its end
        if rt.in_flight >= live.config.limits.max_in_flight:
            rt.metrics.rejected.labels("overload").inc()
            return error_response(503, "the proxy is at limits.max_in_flight; retry shortly",
                                  request_id(request.headers), Retry_After="1")
        rt.in_flight += 1
        try:
            return await self.serve(request, live)
        finally:
            rt.in_flight -= 1
            if rt.draining and rt.in_flight == 0:
                rt.idle.set()

    async def serve(self, request: web.BaseRequest, live: Live) -> web.StreamResponse:
        config = live.config
        out = upstream_headers(request.headers, peer=request.remote or "", scheme=request.scheme,
                               host=request.headers.get("Host"),
                               trusted_hops=config.limits.trusted_hops)
        rid = out[REQUEST_ID]  # the client's X-Request-Id if sane, else a new one
        path_qs = upstream_target(request)
        if path_qs is None:
            return error_response(400, "the request target must be a path", rid)
        try:
            body = await read_body(request, config.limits.max_body_bytes)
        except BodyTooLarge:
            self.rt.metrics.rejected.labels("too_large").inc()
            response = error_response(413, "request body over limits.max_body_bytes "
                                      f"({config.limits.max_body_bytes} bytes)", rid)
            response.force_close()
            return response
        if self.rt.capture is not None:
            self.rt.capture.observe(request.method, request.raw_path, request.headers, body,
                                    request.headers.get("Content-Type", ""))
        # Parsed only if routing reaches the {json: FIELD} source (earlier sources may answer).
        json_body = Lazy(lambda: json_fields(request, body) or {}) \
            if live.reads_json else None
        facts = Facts(request.method, request.path, request.headers,
                      Lazy(lambda: request.cookies), Lazy(lambda: request.query), json_body,
                      request.headers.get("Upgrade", "").lower() == "websocket")
        session = session_id(request, config.routing.session)
        pinned = await self.rt.pins.get(session) if session else None
        decision = decide(facts, config.routing, live.plan, random.random, pinned,
                          config.shadow)
        if decision.skipped is not None:
            self.rt.metrics.shadow_skipped.labels(decision.skipped).inc()
        if decision.gone:
            return self.gone(config, rid)
        if facts.websocket:
            return await self.websocket(request, live, decision, out, rid)
        primary_seen = self.shadow.mirror(live, request.method, path_qs, out, body, rid) \
            if decision.mirror else None
        try:
            try:
                answer = await self.rt.forwarder.obtain(live, decision, request.method,
                                                        path_qs, out, body)
            except UpstreamError as exc:
                if primary_seen is not None:
                    primary_seen.report((no_answer(exc.kind), None))
                return error_response(exc.status, str(exc), rid,
                                      X_Rollout_Backend=decision.primary)
            # Bookkeeping runs once the answer has left (the loop's next turn), not before.
            asyncio.get_running_loop().call_soon(self.served, rid, answer, decision.user)
            if session and answer.backend != pinned:
                self.rt.pins.pin(session, answer.backend)
            return await self.relay(request, live, answer, decision, rid, primary_seen)
        except BaseException:  # cancelled, or a bug: the mirror must not wait for a report
            if primary_seen is not None:
                primary_seen.report(UNFINISHED)
            raise

    def served(self, rid: str, answer: Answer, uid: str | None) -> None:
        """Which backend served whom: for complaints by request id and active users."""
        self.rt.served.remember(rid, answer.backend)
        if answer.role == "primary" and uid is not None:
            self.rt.users.add(answer.backend, uid, self.rt.now)

    def gone(self, config: Config, rid: str) -> web.Response:
        message = "this service has moved to its next generation; opting out is no longer possible"
        body: dict[str, Any] = {"error": message, "request_id": rid}
        if config.rollout.migration_url:
            body["migration_url"] = config.rollout.migration_url
        response = web.Response(status=410, text=json.dumps(body),
                                content_type="application/json")
        response.headers["X-Request-Id"] = rid
        response.headers["X-Rollout-Backend"] = "legacy"
        return response

    async def relay(self, request: web.BaseRequest, live: Live, answer: Answer,
                    decision: Decision, rid: str,
                    primary_seen: Pairing | None) -> web.StreamResponse:
        upstream = answer.response
        headers = downstream_headers(upstream.headers)
        headers["X-Rollout-Backend"] = answer.backend
        headers["X-Request-Id"] = rid
        if answer.fallback_reason:
            headers["X-Rollout-Fallback"] = "true"
        if answer.backend == "legacy" and decision.deprecated:
            headers.extend(self.rt.deprecation_headers(live.config))
        telemetry = live.config.telemetry
        length = upstream.content_length
        if (length is not None and length <= SMALL_BODY and request.method != "HEAD"
                and upstream.status not in NO_BODY_STATUS and "Content-Type" in headers):
            whole = upstream.whole  # the body, if it came with the head
            if whole is not None:
                return self.relay_small(answer, headers, whole, primary_seen, telemetry)
        return await self.relay_stream(request, answer, headers, rid, primary_seen, telemetry)

    def relay_small(self, answer: Answer, headers: CIMultiDict[str], body: bytes,
                    primary_seen: Pairing | None,
                    telemetry: TelemetryConfig) -> web.StreamResponse:
        """A small answer that came whole with its head: head and body leave in one write
        (aiohttp sends an unprepared Response that way). One still arriving streams
        instead: holding its first bytes until the last came would delay them (a drip)."""
        upstream = answer.response
        # Measured once the answer has left (the loop's next turn): off the client's latency.
        asyncio.get_running_loop().call_soon(self.observed_whole, answer, body,
                                             self.rt.monotonic(), primary_seen, telemetry)
        return web.Response(status=upstream.status, reason=upstream.reason, headers=headers,
                            body=body)

    async def relay_stream(self, request: web.BaseRequest, answer: Answer,
                           headers: CIMultiDict[str], rid: str, primary_seen: Pairing | None,
                           telemetry: TelemetryConfig) -> web.StreamResponse:
        """Stream the answer as it arrives (events reach the client one by one)."""
        upstream = answer.response
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
        if upstream.content_length is not None and upstream.status not in NO_BODY_STATUS:
            response.content_length = upstream.content_length
        tee = tee_for(upstream.headers, telemetry, primary_seen is not None)
        first_byte, error = None, None
        try:
            await response.prepare(request)
            while True:
                try:  # a failure reading is the backend's; a failure writing is the client's
                    chunk = await upstream.next_chunk()
                except UpstreamError as exc:
                    error = read_error(exc, answer.backend)
                    break
                if not chunk:
                    break
                if first_byte is None:
                    first_byte = self.rt.monotonic()
                tee.feed(chunk)
                await response.write(chunk)
        except ConnectionError:  # includes aiohttp's ClientConnectionResetError
            error = UpstreamError("client_gone", "the client went away")
        finally:
            upstream.close() if error else upstream.release()
        self.observed(answer, tee, first_byte, error, primary_seen, telemetry)
        if error is not None:
            log.warning(json.dumps({"event": "answer_cut", "request_id": rid,
                                    "backend": answer.backend, "error": str(error)}))
            if request.transport is not None:
                request.transport.abort()  # the client sees the answer end unfinished
            return response
        await response.write_eof()
        return response

    def observed_whole(self, answer: Answer, body: bytes, ended: float,
                       primary_seen: Pairing | None, telemetry: TelemetryConfig) -> None:
        """observed() for a small answer that left in one write."""
        upstream = answer.response
        seen, document = measure_body(upstream.status, upstream.headers, body,
                                      started=answer.started, ended=ended, telemetry=telemetry,
                                      compare=primary_seen is not None, backend=answer.backend)
        self.settled(answer, seen, document, primary_seen)

    def observed(self, answer: Answer, tee: Tee, first_byte: float | None,
                 error: UpstreamError | None, primary_seen: Pairing | None,
                 telemetry: TelemetryConfig) -> None:
        """Measure the answer once; feed metrics, windows and a waiting comparison.
        A client that went away says nothing about the backend: nothing is recorded."""
        upstream = answer.response
        if error is not None and error.kind == "client_gone":
            self.rt.metrics.rejected.labels("client_gone").inc()
            if primary_seen is not None:
                primary_seen.report(None)  # the mirror drops its comparison
            return
        seen, document = measure_tee(
            upstream.status, upstream.headers, tee, started=answer.started,
            first_byte=first_byte, ended=self.rt.monotonic(), telemetry=telemetry,
            error=error.kind if error else None, backend=answer.backend)
        self.settled(answer, seen, document, primary_seen)

    def settled(self, answer: Answer, seen: Measurement, document: Any,
                primary_seen: Pairing | None) -> None:
        self.rt.record(answer.backend, answer.role, seen)
        if primary_seen is not None:
            primary_seen.report((seen, document))

    async def websocket(self, request: web.BaseRequest, live: Live, decision: Decision,
                        out: CIMultiDict[str], rid: str) -> web.StreamResponse:
        """Pass a WebSocket through to the primary backend, frames both ways."""
        pool = live.pools[decision.primary]
        url = pool.backend.url.replace("http", "ws", 1) + (upstream_target(request) or "/")
        headers = replacing(out, pool.backend.headers)
        for name in WEBSOCKET_OWN:  # the client session negotiates its own handshake
            headers.popall(name, None)
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                   if p.strip()]
        try:
            upstream = await pool.websockets().ws_connect(url, headers=headers, protocols=offered)
        except aiohttp.ClientError as exc:
            return error_response(502, f"websocket to {decision.primary} failed: {exc}", rid,
                                  X_Rollout_Backend=decision.primary)
        client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
        client.headers["X-Rollout-Backend"] = decision.primary
        client.headers["X-Request-Id"] = rid
        await client.prepare(request)
        await asyncio.gather(pump(client, upstream), pump(upstream, client))
        return client


async def pump(source: Any, sink: Any) -> None:
    """Frames one way until a close, whose code and reason pass on unchanged."""
    code, reason = aiohttp.WSCloseCode.OK, b""
    while True:
        message = await source.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:
            if message.type == aiohttp.WSMsgType.CLOSE:
                code, reason = message.data, (message.extra or "").encode()
            elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                code, reason = aiohttp.WSCloseCode.INTERNAL_ERROR, b"peer closed abnormally"
            break
    await sink.close(code=code, message=reason)
