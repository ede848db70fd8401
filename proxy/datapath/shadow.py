"""Fire-and-forget mirroring to next_gen, and the comparison of its answer with legacy's.

Rules:
1. The client's answer never waits for a mirror, never changes because of one, and never
   fails because of one.
2. At most `shadow.max_in_flight` mirrors run at once; past that a mirror is dropped and
   counted (reason "overload"), never queued.
3. Mirrors use their own pool and timeout, so a stalled next_gen cannot take the primary
   path's connections.
4. On shutdown running mirrors get a short grace, then are cancelled and counted ("shutdown").
5. Past the sliding-hour budget (shadow.budget) a mirror is dropped ("budget").
6. With shadow.compare.baseline_sample, that share of mirrors also asks legacy a second time
   (inside the same in-flight cap); what differs between legacy's two answers is noise.
7. A mirror holds its in-flight slot while next_gen answers, not while legacy does: the
   comparison is made by whichever of the two answers ends second (Pairing).
8. What mirrors keep to compare is bounded in all by shadow.max_held_bytes: the bodies they
   are reading (a Tee's copy, or an event stream's open line and event; a body that came
   whole in one read is measured at once and keeps nothing) and what the first of
   the two answers parks for the comparison (its parsed JSON, counted as the body bytes it
   came from, at most telemetry.json_max_bytes). Past it that comparison is dropped
   ("held_bytes"); its answers are still measured. A mirror done before a slow legacy is not
   bounded by max_in_flight.
9. Reading mirrors' answers takes at most `shadow.max_loop_share` of the event loop
   (proxy/datapath/loopshare.py): past it a new mirror is dropped ("overload") and one being
   read is cut ("overload" too). A cut mirror is no figure of next_gen's: it is neither
   recorded for the guards nor compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from multidict import CIMultiDict

from proxy.config.model import Config, ShadowConfig
from proxy.datapath.budget import SpendBudget
from proxy.datapath.headers import replacing
from proxy.datapath.live import Live
from proxy.datapath.loopshare import LoopShare
from proxy.datapath.transport import Answer
from proxy.datapath.upstream import UpstreamError, read_error
from proxy.tasks import Tasks
from proxy.telemetry.compare import Noise, compare
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.observe import (
    Measurement,
    Tee,
    measure_body,
    measure_tee,
    no_answer,
    tee_for,
)
from proxy.telemetry.record import TraceRecord
from proxy.telemetry.trace import TraceWriter

SHADOW_HEADER = ("X-Rollout-Shadow", "1")
log = logging.getLogger("rollout_proxy")
WAITING: Any = object()  # the primary has not reported yet
UNFINISHED: Any = object()  # the primary's handler ended without an answer to measure
DROPPED: Any = object()  # an answer not parked: past shadow.max_held_bytes (rule 8)
STARVED: Any = object()  # a mirror's body not read for figures: past max_held_bytes (rule 8)


class Pairing:
    """Where one mirror's answer meets its primary's. The primary reports once (`report`):
    its (Measurement, document), None when the client left mid-answer, or UNFINISHED; the
    mirror stores its answers. Whichever comes second makes the comparison, so neither
    waits for the other (no future, no timer, no task left waiting per mirror)."""

    __slots__ = ("answers", "baseline", "finished", "held", "live", "method", "path_qs",
                 "primary", "rid", "shadow")

    def __init__(self, shadow: Shadow, live: Live, method: str, path_qs: str, rid: str,
                 baseline: bool) -> None:
        self.shadow, self.method, self.path_qs, self.rid = shadow, method, path_qs, rid
        self.live = live  # the snapshot the request started with: this mirror's config
        self.baseline = baseline
        self.primary: Any = WAITING
        self.answers: Sequence[tuple[Measurement, Any]] | None = None
        self.finished = False  # the mirror's requests are over (its slot released)
        self.held = 0  # bytes parked here, counted in Shadow.held_bytes (rule 8)

    def report(self, primary: tuple[Measurement, Any] | None) -> None:
        """The primary's outcome; only the first report counts."""
        if self.primary is not WAITING:
            return
        if self.answers is None and not self.finished and primary is not None \
                and primary is not UNFINISHED:  # parked until the mirror ends
            primary = primary if self.shadow.park(self, (primary,)) else DROPPED
        self.primary = primary
        if self.answers is not None:
            self.shadow.conclude(self)


class Shadow:
    def __init__(self, metrics: Metrics, trace: TraceWriter | None,
                 record: Callable[[str, str, Measurement], None], budget: SpendBudget,
                 share: LoopShare | None = None, max_held_bytes: int = 16 * 2**20,
                 chance: Callable[[], float] = random.random) -> None:
        self.metrics, self.trace = metrics, trace
        self.share = share or LoopShare(1.0)  # rule 9; the mirror pools charge it
        self.record = record  # feeds the metrics and the guards' windows (Runtime.record)
        self.budget, self.chance = budget, chance
        self.noise = Noise()
        self.tasks = Tasks()
        self.in_flight = 0
        self.held_bytes = 0  # kept to compare: read by the mirrors' Tees, or parked (rule 8)
        self.max_held_bytes = max_held_bytes  # shadow.max_held_bytes, set again on reload
        self.closing = False
        self.cut = False  # past the shutdown grace
        self.drained = asyncio.Event()  # set while no mirror is in flight
        self.drained.set()

    @staticmethod
    def copy_headers(config: Config, headers: CIMultiDict[str],
                     backend: str) -> tuple[CIMultiDict[str], tuple[tuple[str, str], ...]]:
        """The mirror's headers, and those to add after them. The client cannot send
        X-Rollout-Shadow (it is dropped on the way in), so without configured headers that
        replace the client's, the client's go as they are, with no copy."""
        configured = (*config.backends[backend].headers, *config.shadow.headers)
        if not configured:
            return headers, (SHADOW_HEADER,)
        return replacing(headers, (*configured, SHADOW_HEADER)), ()

    def mirror(self, live: Live, method: str, path_qs: str, headers: CIMultiDict[str],
               body: bytes | None, rid: str) -> Pairing | None:
        """Start a mirror; the primary reports its measurement to the returned Pairing."""
        shadow = live.config.shadow
        reason = self.refusal(shadow)
        if reason is not None:
            self.metrics.shadow_dropped.labels(reason).inc()
            return None
        baseline = shadow.baseline_sample > 0 and (
            self.in_flight + 2 <= shadow.max_in_flight) and (
            self.chance() < shadow.baseline_sample)
        pairing = Pairing(self, live, method, path_qs, rid, baseline)
        if not self.in_flight:
            self.drained.clear()
        self.in_flight += 2 if baseline else 1
        if baseline:
            self.tasks.start(self.run(method, path_qs, headers, body, pairing), name="mirror")
        else:  # sent on the loop's next turn: after the handler has sent the primary
            asyncio.get_running_loop().call_soon(self.fire, method, path_qs, headers, body,
                                                 pairing)
        return pairing

    def fire(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None,
             pairing: Pairing) -> None:
        """Send the mirror on an idle connection, its answer measured as it is parsed (no
        task per mirror); with none idle, as a task that connects."""
        if self.cut:
            self.metrics.shadow_dropped.labels("shutdown").inc()
            self.release(pairing)
            return
        sink = MirrorSink(self, pairing, method, path_qs, headers, body)
        try:
            live = pairing.live
            sent, extra = self.copy_headers(live.config, headers, "next_gen")
            client = live.mirror_pools["next_gen"].client
            if client.fire(method, path_qs, sent, body, sink, extra):
                return
        except UpstreamError as exc:
            self.ended(pairing, no_answer(exc.kind), None)
            return
        self.tasks.start(self.run(method, path_qs, headers, body, pairing), name="mirror")

    def ended(self, pairing: Pairing, seen: Measurement, document: Any) -> None:
        """A mirror answered without a task (MirrorSink): as run() ends. Never raises."""
        try:
            self.mirrored(pairing, [(seen, document)])
        except Exception:
            log.exception("mirror failed")
        self.release(pairing)
        if pairing.primary is not WAITING:
            self.conclude(pairing)

    def mirrored(self, pairing: Pairing, answers: Sequence[tuple[Measurement, Any]]) -> None:
        shed = starved = False  # a loop, not any(): this runs for every mirror
        for seen, document in answers:
            shed, starved = shed or seen.error == "shed", starved or document is STARVED
        if shed:  # rule 9: not next_gen's doing
            self.metrics.shadow_dropped.labels("overload").inc()
            pairing.answers = DROPPED
            return
        seen = answers[0][0]
        self.record("next_gen", "shadow", seen)
        self.budget.spend(seen.tokens, seen.cost_usd)
        if starved:
            self.metrics.shadow_dropped.labels("held_bytes").inc()
            answers = DROPPED
        elif pairing.primary is WAITING and not self.park(pairing, answers):
            answers = DROPPED
        pairing.answers = answers

    def take(self, size: int) -> bool:
        """The mirrors' Tees' allowance (observe.Allowance): rule 8's bound."""
        if self.held_bytes + size > self.max_held_bytes:
            return False
        self.held_bytes += size
        return True

    def give(self, size: int) -> None:
        self.held_bytes -= size

    def park(self, pairing: Pairing, answers: Sequence[tuple[Measurement, Any]]) -> bool:
        """Keep `answers` in `pairing` until the other half ends, if the bound allows
        (rule 8); else count the comparison as dropped."""
        config = pairing.live.config
        cap = config.telemetry.json_max_bytes
        cost = sum(min(seen.bytes, cap) for seen, document in answers if document is not None)
        if not cost:
            return True
        if not self.take(cost):
            self.metrics.shadow_dropped.labels("held_bytes").inc()
            return False
        pairing.held += cost
        return True

    def release(self, pairing: Pairing) -> None:
        """The mirror's request to next_gen is over: its in-flight slot is free."""
        pairing.finished = True
        self.in_flight -= 2 if pairing.baseline else 1
        if not self.in_flight:
            self.drained.set()

    def refusal(self, config: ShadowConfig) -> str | None:
        if self.closing:
            return "shutdown"
        if self.in_flight >= config.max_in_flight or self.share.spent:
            return "overload"
        if not self.budget.allow():
            return "budget"
        return None

    async def run(self, method: str, path_qs: str, headers: CIMultiDict[str],
                  body: bytes | None, pairing: Pairing) -> None:
        """Ask next_gen (and with a baseline, legacy again); the comparison is made by
        whichever of this and the primary's report comes second (no waiting here)."""
        try:
            answers: Sequence[tuple[Measurement, Any]]
            if pairing.baseline:
                answers = await asyncio.gather(
                    self.send(pairing, "next_gen", method, path_qs, headers, body),
                    self.send(pairing, "legacy", method, path_qs, headers, body))
            else:  # no gather: it would wrap the one send in a task of its own
                answers = [await self.send(pairing, "next_gen", method, path_qs, headers, body)]
            self.mirrored(pairing, answers)
        except asyncio.CancelledError:
            self.metrics.shadow_dropped.labels("shutdown").inc()
            raise
        except Exception:  # started with Tasks.start: nobody else would see it
            log.exception("mirror failed")
        finally:
            self.release(pairing)
            self.tasks.forget(asyncio.current_task())
        if pairing.primary is not WAITING:
            self.conclude(pairing)

    def conclude(self, pairing: Pairing) -> None:
        """Both sides are in: count and trace the comparison. Never raises (it may run in
        the primary's handler)."""
        self.held_bytes -= pairing.held
        pairing.held = 0
        primary, answers = pairing.primary, pairing.answers
        if answers is None or answers is DROPPED or primary is DROPPED:
            return  # the mirror failed outright (logged), or one half was not kept (counted)
        if primary is None:  # the client left mid-answer: nothing to compare
            self.metrics.shadow_dropped.labels("client_gone").inc()
            return
        if primary is UNFINISHED:
            self.metrics.shadow_dropped.labels("primary_unfinished").inc()
            return
        try:
            self.compare(pairing, primary, answers)
        except Exception:
            log.exception("shadow comparison failed")

    def compare(self, pairing: Pairing, primary: tuple[Measurement, Any],
                answers: Sequence[tuple[Measurement, Any]]) -> None:
        config = pairing.live.config
        ignore = frozenset(config.shadow.ignore)
        old, old_document = primary
        seen, document = answers[0]
        if pairing.baseline and answers[1][0].status is not None and old.status is not None:
            self.metrics.measured("legacy", "shadow", answers[1][0])
            self.noise.learn(old_document, answers[1][1], ignore)
        comparison = compare(old, old_document, seen, document, ignore,
                             self.noise if config.shadow.baseline_sample > 0 else None)
        self.metrics.compared(comparison.result)
        if self.trace is not None:  # the SPEC's trace record (proxy/telemetry/record.py)
            self.trace.write_line(TraceRecord.line(
                pairing.rid, time.time(), pairing.method, pairing.path_qs, old,
                seen, comparison))

    async def send(self, pairing: Pairing, backend: str, method: str, path_qs: str,
                   headers: CIMultiDict[str], body: bytes | None) -> tuple[Measurement, Any]:
        live = pairing.live
        telemetry = live.config.telemetry
        started = time.monotonic()
        try:
            sent, extra = self.copy_headers(live.config, headers, backend)
            response = await live.mirror_pools[backend].client.request(
                method, path_qs, sent, body, extra)
        except UpstreamError as exc:
            return no_answer(exc.kind, (time.monotonic() - started) * 1000), None
        tee = tee_for(response.headers, telemetry, True, self)
        first_byte, error, share = None, None, self.share
        try:
            while chunk := await response.next_chunk():
                first_byte = first_byte or time.monotonic()
                fed = time.perf_counter()
                tee.feed(chunk)
                if not share.charge(time.perf_counter() - fed):  # rule 9
                    error = UpstreamError("shed", "past shadow.max_loop_share")
                    break
        except UpstreamError as exc:
            error = read_error(exc, backend)
        finally:
            response.close() if error else response.release()
        seen, document = measure_tee(
            response.status, response.headers, tee, started=started, first_byte=first_byte,
            ended=time.monotonic(), telemetry=telemetry, error=error.kind if error else None,
            backend=backend)
        return seen, STARVED if tee.starved else document

    async def close(self, grace_s: float) -> None:
        """Running mirrors get `grace_s` to end; then the rest are cut and counted."""
        self.closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self.drained.wait()
        self.cut = True  # a mirror ending from here on is counted as shutdown
        await self.tasks.wait(0)  # the pools are the snapshot's: the runtime closes them


class MirrorSink:
    """A mirror's answer, measured as h1 parses it (Client.fire): no task per mirror."""

    __slots__ = ("body", "first_byte", "headers", "method", "pairing", "path_qs", "response",
                 "shadow", "started", "tee")

    def __init__(self, shadow: Shadow, pairing: Pairing, method: str, path_qs: str,
                 headers: CIMultiDict[str], body: bytes | None) -> None:
        self.shadow, self.pairing = shadow, pairing
        self.method, self.path_qs, self.headers, self.body = method, path_qs, headers, body
        self.started = time.monotonic()
        self.first_byte: float | None = None
        self.response: Answer | None = None
        self.tee: Tee | None = None

    def head(self, response: Answer) -> None:
        self.response = response  # its body streams to chunk(), or done() is given it whole

    def chunk(self, data: bytes) -> None:
        tee = self.tee
        if tee is None:
            self.first_byte = time.monotonic()
            assert self.response is not None
            self.tee = tee = tee_for(self.response.headers,
                                     self.pairing.live.config.telemetry, True, self.shadow)
        tee.feed(data)

    def done(self, response: Answer | None, body: bytes | None, error: UpstreamError | None,
             retry: bool) -> None:
        shadow, pairing = self.shadow, self.pairing
        if shadow.cut:
            shadow.metrics.shadow_dropped.labels("shutdown").inc()
            if self.tee is not None:
                self.tee.release()
            shadow.release(pairing)
            return
        if retry:  # the backend had closed the idle connection: again, on a new one
            shadow.tasks.start(shadow.run(self.method, self.path_qs, self.headers, self.body,
                                          pairing), name="mirror")
            return
        ended = time.monotonic()
        if response is None:  # no head: h1 always says why
            assert error is not None
            shadow.ended(pairing, no_answer(error.kind, (ended - self.started) * 1000), None)
            return
        telemetry = pairing.live.config.telemetry
        if body is not None:  # the body came whole, in one read
            # Measured at once from the bytes at hand: none are kept past this call, so
            # none are taken from max_held_bytes (a parked document is, in ended()).
            shadow.ended(pairing, *measure_body(
                response.status, response.headers, body,
                started=self.started, ended=ended, telemetry=telemetry, compare=True,
                backend="next_gen"))
            return
        if self.tee is None:  # failed before any of its body came
            self.tee = tee_for(response.headers, telemetry, True)
        seen, document = measure_tee(
            response.status, response.headers, self.tee, started=self.started,
            first_byte=self.first_byte, ended=ended,
            telemetry=pairing.live.config.telemetry,
            error=read_error(error, "next_gen").kind if error else None, backend="next_gen")
        shadow.ended(pairing, seen, STARVED if self.tee.starved else document)

