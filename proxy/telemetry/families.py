"""Every Prometheus metric family of the proxy, in one table: name, kind, help, labels, the
series made at start, buckets.

1. One table serves both modes: metrics.py builds prometheus_client objects from it (with
   --workers their values are shared through files), or, in one process, lock-free counters
   for the request path's six from the same rows. A family is written here only.
2. No label ever holds a user id, a request id or a raw path: label values come from the
   small fixed sets below (backends, roles, code classes, reasons, phases).
3. `series` are the label values that exist from the start, so dashboards and alerts see
   zeros, not gaps. A hot family must list every series it will be given.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Final, Literal

from proxy.config.model import BACKENDS, PHASES

Kind = Literal["counter", "gauge", "histogram"]
Mode = Literal["livesum", "mostrecent"]
Series = tuple[str, ...]

ROLES: Final = ("primary", "shadow", "fallback")
CODE_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")
COMPARISON_RESULTS: Final = ("match", "mismatch", "error")
TRACE_RESULTS: Final = ("written", "dropped", "error")
DROP_REASONS: Final = ("overload", "shutdown", "budget", "held_bytes")
REFUSED_ANSWERS: Final = ("head_too_large",)  # the error kinds of answers cut for passing a bound
LATENCY_BUCKETS: Final = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60,
                          120)
MB: Final = 2**20
MEMORY_BUCKETS: Final = tuple(mb * MB for mb in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                                   8192))
SUMMED: Final[Mode] = "livesum"  # with --workers: the sum of the live workers' values
LATEST: Final[Mode] = "mostrecent"  # with --workers: a gauge every worker sets alike


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    series: tuple[Series, ...] = ()
    buckets: tuple[float, ...] = ()
    mode: Mode = SUMMED  # a gauge's --workers aggregation


def every(*values: tuple[str, ...]) -> tuple[Series, ...]:
    return tuple(product(*values))


BR: Final = ("backend", "role")
PAIRS: Final = every(BACKENDS, ROLES)

# The request path's six: lock-free in one process (metrics.HotFamilies).
REQUESTS: Final = Family("rollout_requests", "counter",
                         "Answers by backend, role and status class",
                         (*BR, "code_class"), every(BACKENDS, ROLES, CODE_CLASSES))
DURATION: Final = Family("rollout_request_duration_seconds", "histogram",
                         "Time to an answer's last byte", BR, PAIRS, LATENCY_BUCKETS)
TTFB: Final = Family("rollout_time_to_first_byte_seconds", "histogram",
                     "Time to an answer's first body byte", BR, PAIRS, LATENCY_BUCKETS)
TOKENS: Final = Family("rollout_tokens", "counter", "Tokens the backends reported", BR, PAIRS)
COMPARISONS: Final = Family("rollout_shadow_comparisons", "counter",
                            "Shadow comparisons by result", ("result",),
                            every(COMPARISON_RESULTS))
TRACE_LINES: Final = Family("rollout_trace_lines", "counter", "Comparison trace lines",
                            ("result",), every(TRACE_RESULTS))
HOT: Final = (REQUESTS, DURATION, TTFB, TOKENS, COMPARISONS, TRACE_LINES)

COST: Final = Family("rollout_cost_usd", "counter", "What the backends' reported tokens cost, USD",
                     BR)
MEMORY: Final = Family("rollout_memory_bytes", "histogram", "Memory the backends reported", BR,
                       buckets=MEMORY_BUCKETS)
REJECTED_ANSWERS: Final = Family("rollout_rejected_answers", "counter",
                                 "Backend answers the proxy cut for passing a bound",
                                 (*BR, "reason"), every(BACKENDS, ROLES, REFUSED_ANSWERS))
REJECTED: Final = Family("rollout_rejected_requests", "counter",
                         "Requests the proxy refused itself", ("reason",))
FALLBACKS: Final = Family("rollout_fallbacks", "counter", "Requests legacy answered for next_gen",
                          ("reason",))
IN_FLIGHT: Final = Family("rollout_in_flight_requests", "gauge", "Client requests being served")

SHADOW_DROPPED: Final = Family("rollout_shadow_dropped", "counter",
                               "Mirrors not sent or not finished", ("reason",),
                               every(DROP_REASONS))
SHADOW_SKIPPED: Final = Family("rollout_shadow_skipped", "counter",
                               "Requests never mirrored by the side-effect rules", ("reason",))
SHADOW_IN_FLIGHT: Final = Family("rollout_shadow_in_flight", "gauge", "Mirrors running now")
SHADOW_HELD: Final = Family("rollout_shadow_held_bytes", "gauge",
                            "Bytes of answers parked until their shadow comparison")

PERCENTAGE: Final = Family("rollout_percentage", "gauge", "Effective rollout percentage",
                           mode=LATEST)
PHASE: Final = Family("rollout_phase", "gauge", "1 for the effective phase", ("phase",),
                      every(PHASES), mode=LATEST)
PAUSED: Final = Family("rollout_paused", "gauge", "1 while the schedule is paused", mode=LATEST)
ROLLBACKS: Final = Family("rollout_rollbacks", "counter", "Rollbacks by trigger", ("trigger",))
RELOADS: Final = Family("rollout_config_reloads", "counter", "Config reloads by result",
                        ("result",))
CIRCUIT: Final = Family("rollout_circuit_state", "gauge", "0 closed, 1 open, 2 half_open",
                        ("backend",), every(BACKENDS), mode=LATEST)
GUARD_STATE: Final = Family("rollout_guard_state", "gauge", "1 when a guard is tripped",
                            ("guard",), mode=LATEST)
ADMIN_CHANGES: Final = Family("rollout_admin_changes", "counter", "Runtime changes by action",
                              ("action",))
STATE_STORE_UP: Final = Family("rollout_state_store_up", "gauge",
                               "1 while the shared state store is reachable", mode=LATEST)

SESSIONS_PINNED: Final = Family("rollout_sessions_pinned", "gauge",
                                "Sessions pinned to a backend")
FEEDBACK: Final = Family("rollout_feedback", "counter", "Feedback scores by backend",
                         ("backend", "score"))
MIGRATION_REPORTS: Final = Family("rollout_migration_reports", "counter",
                                  "Users' migration reports", ("result",))
ACTIVE_USERS: Final = Family("rollout_active_users", "gauge", "Distinct users today (UTC)",
                             ("backend",), mode=LATEST)
COMPLAINTS: Final = Family("rollout_complaints", "counter",
                           "Complaints by the backend they concern", ("backend",))

FAMILIES: Final = (*HOT, COST, MEMORY, REJECTED_ANSWERS, REJECTED, FALLBACKS, IN_FLIGHT,
                   SHADOW_DROPPED, SHADOW_SKIPPED, SHADOW_IN_FLIGHT, SHADOW_HELD, PERCENTAGE,
                   PHASE, PAUSED, ROLLBACKS, RELOADS, CIRCUIT, GUARD_STATE, ADMIN_CHANGES,
                   STATE_STORE_UP, SESSIONS_PINNED, FEEDBACK, MIGRATION_REPORTS, ACTIVE_USERS,
                   COMPLAINTS)
