"""Wiring and lifecycle: build every object from the config, serve both listeners, drain.

Shutdown (SIGTERM/SIGINT): /readyz turns 503, the listener stops accepting, requests in
flight (streams included) get up to limits.drain_timeout_s, mirrors a short grace, the trace
is flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CollectorRegistry

from proxy.config.loading import load_config
from proxy.config.model import Config
from proxy.control.admin import Admin
from proxy.control.controller import Controller
from proxy.datapath.budget import SpendBudget
from proxy.datapath.capture import Capture
from proxy.datapath.handler import ProxyHandler
from proxy.datapath.loopshare import LoopShare
from proxy.datapath.runtime import Runtime
from proxy.datapath.sessions import Pins, RedisPins
from proxy.datapath.shadow import Shadow
from proxy.datapath.transport import Transport
from proxy.datapath.upstream import H1, transport_named
from proxy.state.store import FileStore, Store, due_steps, write_atomically
from proxy.state.users import ActiveUsers, DistinctUsers, RedisActiveUsers
from proxy.telemetry.metrics import CIRCUIT_STATES, Metrics
from proxy.telemetry.trace import TraceWriter

log = logging.getLogger("rollout_proxy")
SHADOW_GRACE_S = 2.0
TIMEOUT_BODY = json.dumps({"error": "request head not received within limits.header_timeout_s",
                           "request_id": None}).encode()
TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(TIMEOUT_BODY)).encode()
                  + b"\r\n\r\n" + TIMEOUT_BODY)


SERVER_OPTIONS: dict[str, Any] = {"access_log": None, "keepalive_timeout": 75,
                                  "max_field_size": 16384}
GC_THRESHOLDS = (10_000, 50, 20)  # CPython's are (700, 10, 10); see tune_gc()


class HeadDeadlineHandler(RequestHandler):
    """aiohttp has no header-read timeout (PITFALLS.md): cut a client off whose request
    head has not fully arrived within the deadline, with a 408.

    This subclasses aiohttp's RequestHandler (aiohttp.web_protocol, not a public API) because
    aiohttp offers no public hook for either job done here: a deadline on the request head
    (web.Server's options bound idle keep-alive only), and the answer to a request its parser
    refused (handle_error; middlewares never see those). It overrides only connection_made,
    data_received, connection_lost and handle_error, and reads _request_in_progress and
    _messages; tests/test_e2e_data_path.py drives both behaviours over real sockets, so an
    aiohttp upgrade that moves them fails the suite rather than the users."""

    header_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.header_timeout_s, self._too_slow)

    def data_received(self, data: bytes) -> None:
        starting = (self._deadline is None and not self._request_in_progress
                    and not self._messages)  # these bytes begin a new request head
        super().data_received(data)
        if self._messages:  # the head is whole
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
        elif starting and self.transport is not None and not self.transport.is_closing():
            self._arm()  # only part of the head came: a timer only then, not per request

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Errors the proxy makes itself are JSON (SPEC), and a malformed request is one
        compact log line, not a traceback any client could flood the logs with."""
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        rid = uuid.uuid4().hex
        if status >= 500:
            self.log_exception("error handling a request", exc_info=exc)
        else:
            log.info(json.dumps({"event": "bad_request", "status": status, "request_id": rid,
                                 "detail": str(exc or message or "")[:200]}))
        reason = str(getattr(exc, "message", "") or message or "bad request").strip()
        answer = web.json_response({"error": reason[:200], "request_id": rid}, status=status,
                                   headers={"X-Request-Id": rid})
        answer.force_close()
        return answer

    def _too_slow(self) -> None:
        self._deadline = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        with contextlib.suppress(Exception):
            self.transport.write(TIMEOUT_ANSWER)
        self.transport.close()


class ProxySite(web.BaseSite):
    """A TCP site whose connections get the head deadline; SO_REUSEPORT for --workers."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 header_timeout_s: float, reuse_port: bool = False) -> None:
        super().__init__(runner, backlog=2048)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._header_timeout_s = header_timeout_s

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        deadline = type("Handler", (HeadDeadlineHandler,),
                        {"header_timeout_s": self._header_timeout_s})
        loop = asyncio.get_running_loop()
        kwargs = SERVER_OPTIONS  # what web.Server was made with: its handlers get the same

        def factory() -> RequestHandler:
            handler: RequestHandler = deadline(server, loop=loop, **kwargs)
            return handler

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True,
            reuse_port=self._reuse_port)


@dataclass
class Proxy:
    """Everything one proxy process runs."""

    runtime: Runtime
    control: Controller
    admin: Admin
    trace: TraceWriter | None
    handler: ProxyHandler
    shadow: Shadow
    runners: list[web.BaseRunner] = field(default_factory=list)
    worker: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    ports: dict[str, int] = field(default_factory=dict)


def build(config: Config, *, registry: CollectorRegistry | None = None,
          store: Store | None = None, token: Callable[[], str | None] | None = None,
          multiprocess_dir: str | None = None, worker: int = 0, transport: Transport = H1,
          **clocks: Any) -> Proxy:
    """Every object the process runs, made whole here; start() only starts them.
    `transport` speaks to the backends (h1 by default); `clocks` are clock, monotonic and
    sleep, for tests."""
    metrics = Metrics(registry, multiprocess_dir)
    store = store or make_store(config, metrics)
    client = getattr(store, "client", None)  # state in Redis: pins and users there too
    routing = config.routing
    monotonic = clocks.get("monotonic", time.monotonic)
    pins = RedisPins(client, routing.session_ttl_s, routing.session_max, monotonic) \
        if client is not None else Pins(routing.session_ttl_s, routing.session_max, monotonic)
    capture = Capture(config.telemetry.capture) \
        if config.telemetry.capture is not None and worker == 0 else None  # one writer
    share = LoopShare(config.shadow.max_loop_share)  # mirrors' reads: their pools, the shadow
    runtime = Runtime(config, metrics=metrics, store=store, users=load_users(config, client),
                      pins=pins, capture=capture, transport=transport, mirror_share=share,
                      **clocks)
    share.clients = runtime  # the share binds while clients wait
    trace = None
    if config.telemetry.trace_file is not None:
        trace = TraceWriter(config.telemetry.trace_file, max_bytes=config.telemetry.trace_max_bytes,
                            keep=config.telemetry.trace_keep, metrics=metrics,
                            rotate=worker == 0)
    runtime.breaker.on_change = lambda state: metrics.circuit.labels("next_gen").set(
        CIRCUIT_STATES[state])
    budget = SpendBudget(config.shadow.tokens_per_hour, config.shadow.usd_per_hour,
                         runtime.monotonic)
    shadow = Shadow(metrics, trace, runtime.record, budget, share,
                    config.shadow.max_held_bytes)
    metrics.track_in_flight(lambda: shadow.in_flight, metrics.shadow_in_flight)
    metrics.track_in_flight(lambda: shadow.held_bytes, metrics.shadow_held)

    def apply(new: Config) -> None:
        runtime.reload(new)
        budget.cap(new.shadow.tokens_per_hour, new.shadow.usd_per_hour)
        share.share = new.shadow.max_loop_share
        shadow.max_held_bytes = new.shadow.max_held_bytes

    control = Controller(runtime, path=config.source, apply_config=apply)
    env_name = config.admin.token_env
    admin = Admin(runtime, control, shadow, token or (lambda: os.environ.get(env_name) or None))
    return Proxy(runtime, control, admin, trace, ProxyHandler(runtime, shadow), shadow,
                 worker=worker)


def make_store(config: Config, metrics: Metrics) -> Store:
    if config.state.backend == "redis" and config.state.redis_url:
        from proxy.state.redis_store import RedisStore

        return RedisStore(config.state.redis_url, metrics)
    return FileStore(config.state.path)


async def start(proxy: Proxy, *, reuse_port: bool = False) -> None:
    rt, config = proxy.runtime, proxy.runtime.config
    await rt.store.start()
    rt.stored = rt.store.load()  # Redis's copy is known only once connected
    rt.applied = due_steps(config.rollout.schedule, rt.stored, rt.clock())
    rt.refresh()
    if proxy.trace is not None:
        rt.tasks.spawn(proxy.trace.run(), name="trace-writer")
    if rt.capture is not None:
        rt.tasks.spawn(rt.capture.run(), name="capture")
    rt.tasks.spawn(keep_users(rt, users_file(config)), name="active-users")
    rt.tasks.spawn(proxy.control.run(), name="control-loop")
    rt.tasks.spawn(proxy.control.watch_state(), name="state-watch")
    proxy.control.tick()

    server = web.Server(proxy.handler, **SERVER_OPTIONS)
    # stop() gives requests drain_timeout_s itself; cleanup then only cancels what is left.
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = ProxySite(runner, config.listen.host, config.listen.port,
                     config.limits.header_timeout_s, reuse_port)
    await site.start()
    admin_runner = web.AppRunner(proxy.admin.app(), access_log=None, handle_signals=False,
                                 shutdown_timeout=1)
    await admin_runner.setup()
    admin_site = web.TCPSite(admin_runner, config.admin.listen.host, config.admin.listen.port,
                             reuse_port=reuse_port)
    await admin_site.start()
    proxy.runners = [runner, admin_runner]
    proxy.ports = {"proxy": bound_port(runner), "admin": bound_port(admin_runner)}
    proxy.admin.started = True
    log.info(json.dumps({"event": "serving", "listen": str(config.listen),
                         "admin": str(config.admin.listen), "phase": rt.plan.phase,
                         "percentage": rt.plan.percentage, "config_version": config.version}))


def users_file(config: Config) -> Path | None:
    """The active-user sketches beside the state file (file store only): written once a
    minute, not with every state change, since 90 days of sketches weigh megabytes."""
    if config.state.backend == "redis":
        return None
    return config.state.path.with_name(config.state.path.stem + ".users.json")


def load_users(config: Config, client: Any) -> DistinctUsers:
    """The active-user sketches: in Redis with the state, else read once from their file
    (at startup, before the loop serves anything)."""
    days = config.telemetry.active_users_days
    if client is not None:
        return RedisActiveUsers(client, days)
    path = users_file(config)
    try:
        text = path.read_text() if path is not None else "{}"
        return ActiveUsers.from_json(json.loads(text), days)
    except (OSError, ValueError):
        return ActiveUsers(days)


async def save_users(rt: Runtime, path: Path | None) -> None:
    users = rt.users
    if isinstance(users, RedisActiveUsers):
        await users.flush()  # ids buffered since the last second
        return
    if path is None or not isinstance(users, ActiveUsers):
        return
    snapshot = users.to_json()
    try:
        await asyncio.to_thread(merge_and_write, snapshot, path,
                                rt.config.telemetry.active_users_days)
    except OSError as exc:
        log.error(json.dumps({"event": "users_save_failed", "error": str(exc)}))


def merge_and_write(snapshot: dict[str, Any], path: Path, days: int) -> None:
    """Workers share the file: union what is there with ours, under a lock, then replace it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        combined = ActiveUsers.from_json(snapshot, days)
        with contextlib.suppress(FileNotFoundError, ValueError):
            combined.merge(json.loads(path.read_text()))
        write_atomically(path, json.dumps(combined.to_json()))


async def keep_users(rt: Runtime, path: Path | None) -> None:
    """Flush and recount the active-user sketches; persist them once a minute."""
    ticks = 0
    while True:
        await asyncio.sleep(1)
        ticks += 1
        users = rt.users
        await users.flush()
        if ticks % 5 == 0:
            await users.refresh(rt.clock())
            for backend in ("legacy", "next_gen"):
                rt.metrics.active_users.labels(backend).set(users.today(backend))
        if ticks % 60 == 0:
            await save_users(rt, path)


def bound_port(runner: web.BaseRunner) -> int:
    """The port the runner's one site listens on (the OS picks it for port 0)."""
    addresses = runner.addresses
    return int(addresses[0][1]) if addresses else 0


async def stop(proxy: Proxy) -> None:
    rt = proxy.runtime
    rt.draining = True
    proxy_runner, admin_runner = proxy.runners
    for site in list(proxy_runner.sites):
        await site.stop()  # stop accepting; connections in flight go on
    if rt.in_flight > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rt.config.limits.drain_timeout_s):
                await rt.idle.wait()
    await proxy_runner.cleanup()
    await proxy.shadow.close(SHADOW_GRACE_S)
    await rt.tasks.wait(0)
    await save_users(rt, users_file(rt.config))
    if rt.capture is not None:
        await rt.capture.close()
    if proxy.trace is not None:
        await proxy.trace.close()
    await rt.close()
    await rt.pins.close()
    await rt.store.close()
    await admin_runner.cleanup()
    log.info(json.dumps({"event": "stopped", "left_in_flight": rt.in_flight}))


def tune_gc() -> None:
    """Collect less often, and never again look at what startup made.

    With 5,000 slow requests in flight (10,000 sockets, their handlers and futures), the
    default thresholds ran a full collection every second or so, each up to 280 ms with
    the loop stopped: p99 2.3 s for 2 s answers. With these, p99 was 2.01 s. Garbage in
    cycles is still collected, in larger batches (`make bench` slow5000 and soak)."""
    gc.collect()
    gc.freeze()  # modules, config and the like: alive for good, never worth a scan
    gc.set_threshold(*GC_THRESHOLDS)


M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
MMAP_THRESHOLD = 128 * 1024  # glibc's default, made fixed


def tune_malloc() -> bool:
    """Large blocks (over 128 KiB) always from mmap, so they go back to the system when freed.

    By default glibc raises its mmap threshold each time such a block is freed, and later
    blocks that size come from the main heap, which only shrinks from its top. In the soak
    the table of the served-request-id dict (about 5 MB, rebuilt every few seconds as ids
    come and go) did that: RSS climbed in 10 MB steps for three minutes, 88 -> 110 MB. With
    a fixed threshold it stayed at 88-90 MB. False where there is no glibc mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


async def serve(path: Path, *, reuse_port: bool = False, worker: int = 0,
                multiprocess_dir: str | None = None, transport: str = "h1") -> int:
    tune_malloc()
    config = load_config(path)
    proxy = build(config, multiprocess_dir=multiprocess_dir, worker=worker,
                  transport=transport_named(transport))
    await start(proxy, reuse_port=reuse_port)
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, proxy.control.reload)
    await proxy.stopping.wait()
    log.info(json.dumps({"event": "draining", "in_flight": proxy.runtime.in_flight}))
    await stop(proxy)
    return 0
