"""When legacy answers for a failing next_gen: the failure kinds, a retry budget, a breaker,
`plan()`, the one place that says what happens to an answer (serve it, retry the request on
legacy, or fail with the upstream's error), and `Forwarder.obtain`, which only carries the
plan out: the one place a request is sent to its backends.

Rules:
1. Fallback happens only before anything was sent to the client, for the kinds `fallback.on`
   names: connect_error (nothing reached next_gen), timeout, 5xx (also resets and garbage,
   which the proxy would answer as 502) and explicit status codes.
2. The budget caps fallbacks at `budget_ratio` of requests over a rolling window (Envoy's
   retry budget), so a next_gen outage cannot double legacy's load.
3. The breaker opens after `consecutive_failures` or an error rate over its window, skips
   next_gen for `cooldown_s`, then lets `probes` requests through before closing again.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from proxy.config.model import CircuitConfig, FallbackConfig
from proxy.datapath import transport
from proxy.datapath.decide import Decision
from proxy.datapath.headers import replacing
from proxy.datapath.live import Live
from proxy.datapath.upstream import UpstreamError
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.observe import Measurement, measure, no_answer

log = logging.getLogger("rollout_proxy")
FIVE_XX_KINDS = frozenset({"reset", "bad_response", "head_too_large"})


@dataclass(frozen=True, slots=True)
class Next:
    """What to do next: `send` the request to its primary, `serve` the answer there is,
    `legacy` (ask legacy, for `reason`), or `fail` with the upstream error. `budget` says the
    retry budget refused a fallback that was due (counted as such)."""

    action: str  # send | serve | legacy | fail
    reason: str | None = None
    budget: bool = False


SEND, SERVE, FAIL = Next("send"), Next("serve"), Next("fail")


def before(decision: Decision, config: FallbackConfig, breaker: Breaker,
           budget: RetryBudget) -> Next:
    """Before sending: straight to legacy while the breaker is open; else send (counted in
    the retry budget's requests)."""
    if (decision.primary == "next_gen" and decision.fallback and config.enabled
            and not breaker.allow()):
        return Next("legacy", "circuit_open")
    budget.request()
    return SEND


def plan(decision: Decision, config: FallbackConfig, error: UpstreamError | None,
         status: int | None, breaker: Breaker, budget: RetryBudget) -> Next:
    """After the primary answered (`status`) or failed (`error`)."""
    if decision.primary != "next_gen":
        return FAIL if error is not None else SERVE
    breaker.record(error is None and status is not None and status < 500)
    reason = fallback_reason(config, error, status) if decision.fallback else None
    if reason is None:
        return FAIL if error is not None else SERVE
    if not budget.allow():  # past the budget: next_gen's own answer (or error), untouched
        return Next("fail" if error is not None else "serve", reason, budget=True)
    return Next("legacy", reason)


def fallback_reason(config: FallbackConfig, error: UpstreamError | None,
                    status: int | None) -> str | None:
    """The reason legacy should answer instead, or None."""
    if not config.enabled:
        return None
    if error is not None:
        if error.kind in config.on:
            return error.kind
        if error.kind in FIVE_XX_KINDS and "5xx" in config.on:
            return "5xx"
        return None
    if status is None:
        return None
    if status in config.statuses:
        return "status"
    if status >= 500 and "5xx" in config.on:
        return "5xx"
    return None


@dataclass(slots=True)
class Answer:
    backend: str
    role: str  # primary | fallback
    response: transport.Answer
    started: float
    fallback_reason: str | None = None


class Forwarder:
    """Sends a request to its primary, and to legacy when `plan()` says so: the plan's I/O.
    Every answer passed over, and every failure, is recorded (`record`, `recorded`: the
    runtime's, which feed metrics and the guards' windows)."""

    def __init__(self, breaker: Breaker, budget: RetryBudget, metrics: Metrics, *,
                 record: Callable[[str, str, Measurement], None],
                 recorded: Callable[[str, Measurement], None],
                 monotonic: Callable[[], float],
                 sleep: Callable[[float], Awaitable[Any]]) -> None:
        self.breaker, self.budget, self.metrics = breaker, budget, metrics
        self.record, self.recorded = record, recorded
        self.monotonic, self.sleep = monotonic, sleep

    async def obtain(self, live: Live, decision: Decision, method: str, path_qs: str,
                     headers: CIMultiDict[str], body: bytes | None) -> Answer:
        """The primary's answer head, or legacy's when next_gen failed and fallback applies."""
        config, primary = live.config.fallback, decision.primary
        step = before(decision, config, self.breaker, self.budget)
        if step.action == "legacy":  # the breaker is open: one try on legacy, not budgeted
            self.metrics.fallbacks.labels("circuit_open").inc()
            return await self.on_legacy(live, "circuit_open", 1, method, path_qs, headers,
                                        body)
        answer, error = None, None
        try:
            answer = await self.send(live, primary, "primary", method, path_qs, headers, body)
        except UpstreamError as exc:
            self.failed(primary, "primary", exc)
            error = exc
        step = plan(decision, config, error,
                    answer.response.status if answer is not None else None,
                    self.breaker, self.budget)
        if step.budget:
            self.metrics.fallbacks.labels("budget").inc()
        if step.action == "serve":
            assert answer is not None
            return answer
        if step.action == "fail":
            assert error is not None
            raise error
        assert step.reason is not None
        if answer is not None:  # next_gen answered, but not well enough to serve
            answer.response.release()
            self.unread(live, answer)
        self.metrics.fallbacks.labels(step.reason).inc()
        return await self.on_legacy(live, step.reason, config.attempts, method, path_qs,
                                    headers, body)

    async def on_legacy(self, live: Live, reason: str, attempts: int, method: str,
                        path_qs: str, headers: CIMultiDict[str], body: bytes | None) -> Answer:
        async for attempt in retrying(attempts, self.sleep):
            with attempt:
                try:
                    answer = await self.send(live, "legacy", "fallback", method, path_qs,
                                             headers, body)
                except UpstreamError as exc:
                    self.failed("legacy", "fallback", exc)
                    raise
                answer.fallback_reason = reason
                return answer
        raise AssertionError("not reached: tenacity re-raises the last error")

    async def send(self, live: Live, backend: str, role: str, method: str, path_qs: str,
                   headers: CIMultiDict[str], body: bytes | None) -> Answer:
        started = self.monotonic()
        configured = live.config.backends[backend].headers
        if configured:
            headers = replacing(headers, configured)
        # The pool's client is the transport seam: errors come named for the backend.
        response = await live.pools[backend].client.request(method, path_qs, headers, body)
        return Answer(backend, role, response, started)

    def failed(self, backend: str, role: str, exc: UpstreamError) -> None:
        self.metrics.errored(backend, role, exc.kind)
        self.recorded(backend, no_answer(exc.kind))
        log.warning(json.dumps({"event": "upstream_error", "backend": backend, "role": role,
                                "kind": exc.kind, "detail": exc.detail}))

    def unread(self, live: Live, answer: Answer) -> None:
        """An answer passed over unread (next_gen's, before a fallback): measured from its
        head alone, by the same function as every other answer."""
        response = answer.response
        self.record(answer.backend, answer.role, measure(
            response.status, response.headers, None, started=answer.started, first_byte=None,
            ended=self.monotonic(), size=0, telemetry=live.config.telemetry,
            backend=answer.backend))


def retrying(attempts: int, sleep: Callable[[float], Awaitable[Any]]) -> AsyncRetrying:
    return AsyncRetrying(stop=stop_after_attempt(attempts),
                         wait=wait_random_exponential(multiplier=0.05, max=1.0),
                         retry=retry_if_exception_type(UpstreamError), reraise=True,
                         sleep=sleep)


class RetryBudget:
    """Fallbacks allowed: at most `ratio` of the requests seen in the last `window_s`,
    counted in per-second buckets [second, requests, retries] so memory stays flat."""

    def __init__(self, ratio: float, window_s: float, monotonic: Callable[[], float]) -> None:
        self.ratio, self.window_s, self.monotonic = ratio, window_s, monotonic
        self.buckets: deque[list[int]] = deque()
        self.requests = self.retries = 0

    def _bucket(self) -> list[int]:
        now = self.monotonic()
        second = int(now)
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0, 0])
            edge = now - self.window_s
            while self.buckets and self.buckets[0][0] < edge:
                _, requests, retries = self.buckets.popleft()
                self.requests -= requests
                self.retries -= retries
        return self.buckets[-1]

    def request(self) -> None:
        self._bucket()[1] += 1
        self.requests += 1

    def allow(self) -> bool:
        bucket = self._bucket()
        # A floor of a few fallbacks keeps low traffic from being refused every retry.
        if self.retries >= max(3.0, self.ratio * self.requests):
            return False
        bucket[2] += 1
        self.retries += 1
        return True


class Breaker:
    """closed → open (skip next_gen) → half_open (a few probes) → closed, on a clock."""

    def __init__(self, config: CircuitConfig, monotonic: Callable[[], float],
                 on_change: Callable[[str], None] | None = None) -> None:
        self.config, self.monotonic, self.on_change = config, monotonic, on_change
        self.state = "closed"
        self.consecutive = 0
        self.outcomes: deque[tuple[float, bool]] = deque()
        self.failures = 0  # failures among `outcomes`, kept in step with it
        self.opened_at = 0.0
        self.probes_left = 0
        self.probe_successes = 0

    def _set(self, state: str) -> None:
        self.state = state
        if self.on_change is not None:
            self.on_change(state)

    def allow(self) -> bool:
        if self.state == "open":
            if self.monotonic() - self.opened_at < self.config.cooldown_s:
                return False
            self._set("half_open")
            self.probes_left, self.probe_successes = self.config.probes, 0
        if self.state == "half_open":
            if self.probes_left <= 0:
                # Probes that never reported back must not hold the breaker half-open forever.
                if self.monotonic() - self.opened_at < 2 * self.config.cooldown_s:
                    return False
                self.opened_at = self.monotonic() - self.config.cooldown_s
                self.probes_left, self.probe_successes = self.config.probes, 0
            self.probes_left -= 1
        return True

    def record(self, ok: bool) -> None:
        now = self.monotonic()
        if self.state == "half_open":
            if not ok:
                self._open(now)
                return
            self.probe_successes += 1
            if self.probe_successes >= self.config.probes:
                self._close()
            return
        if self.state == "open":
            return
        self.consecutive = 0 if ok else self.consecutive + 1
        self.outcomes.append((now, ok))
        self.failures += not ok
        edge = now - self.config.window_s
        while self.outcomes and self.outcomes[0][0] < edge:
            self.failures -= not self.outcomes.popleft()[1]
        if self.consecutive >= self.config.consecutive_failures or self._rate_tripped():
            self._open(now)

    def _rate_tripped(self) -> bool:
        total = len(self.outcomes)
        if total < self.config.min_requests:
            return False
        return self.failures / total > self.config.error_rate

    def _open(self, now: float) -> None:
        self.opened_at = now
        self.outcomes.clear()
        self.failures = 0
        self.consecutive = 0
        self._set("open")

    def _close(self) -> None:
        self.consecutive = 0
        self.outcomes.clear()
        self.failures = 0
        self._set("closed")
