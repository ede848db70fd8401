"""Where a request goes: a pure function from request facts and the rollout's state to a Decision.
This is the one place a request is decided: the handler, `assign` and /admin/status (whose
backend a complaint counts against) all ask `decide` or `for_user`.

Rules:
1. The bucket is mmh3.hash(salt + ":" + user_id, signed=False) % 10000; a user is on next_gen
   when bucket < percentage * 100. Python's hash() is never used (salted per process).
   With `bucketing: unleash` the cohort is Unleash's gradualRollout one instead:
   murmur3_x86_32(salt + ":" + user_id, seed 0) % 100 + 1 <= percentage.
2. Paths outside `routing.paths` go to legacy, untouched by the rollout.
3. The opt header is honoured in opt_in, progressive, default and sunset.
4. Mirroring only ever copies a request legacy serves, in shadow, opt_in and progressive,
   and only `shadow.methods` outside `shadow.exclude_paths` (a copy must not repeat a side effect).
5. A pinned session stays on the backend that served its first request while the percentage
   or phase moves; a rollback overrides pins (safety first).
6. A WebSocket goes to its primary with no mirror and no fallback (frames cannot be replayed).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mmh3

from proxy.config.model import RoutingConfig, ShadowConfig

OPT_IN = frozenset({"1", "true", "yes"})
OPT_OUT = frozenset({"0", "false", "no"})
SERVES_OPT = frozenset({"opt_in", "progressive", "default", "sunset"})
MIRRORS = frozenset({"shadow", "opt_in", "progressive"})


# Facts and Decision are made once per request: plain slotted dataclasses, since a frozen
# one's __init__ costs five times as much. Nothing mutates them after construction.
@dataclass(slots=True)
class Facts:
    """What the routing needs to know of a request, gathered by the server."""

    method: str
    path: str
    headers: Mapping[str, str]
    cookies: Mapping[str, str]
    query: Mapping[str, str]
    json_body: Mapping[str, Any] | None = None
    websocket: bool = False  # an Upgrade: websocket request


@dataclass(frozen=True, slots=True)
class Plan:
    """The rollout's effective position at this moment (the YAML plus any runtime override)."""

    phase: str
    percentage: float
    salt: str
    sample: float
    bucketing: str = "murmur3"
    rolled_back: bool = False


@dataclass(slots=True)
class Decision:
    primary: str  # legacy | next_gen
    mirror: bool
    fallback: bool  # legacy may answer when next_gen fails
    reason: str  # why, in words an operator reads in logs
    gone: bool = False  # sunset's 410 for an opted-out request
    deprecated: bool = False  # a legacy answer in `default`: Deprecation / Sunset headers
    bucket: int | None = None
    user: str | None = None  # the user id the routing read, for active users
    skipped: str | None = None  # why a mirror due was not made: method | excluded_path


def bucket(salt: str, user_id: str) -> int:
    return int(mmh3.hash(f"{salt}:{user_id}", signed=False)) % 10000


def on_next_gen(bucket_value: int, percentage: float) -> bool:
    return bucket_value < round(percentage * 100, 6)  # 0.07 * 100 is 7.000000000000001


def unleash_value(salt: str, user_id: str) -> int:
    """Unleash's normalizedValue: 1..100, the same for the same groupId and user."""
    return int(mmh3.hash(f"{salt}:{user_id}", 0, signed=False)) % 100 + 1


def in_cohort(plan: Plan, user_id: str) -> tuple[bool, int]:
    """Whether the user is in the next_gen cohort at the plan's percentage, and its bucket."""
    if plan.bucketing == "unleash":
        value = unleash_value(plan.salt, user_id)
        return value <= plan.percentage, value
    value = bucket(plan.salt, user_id)
    return on_next_gen(value, plan.percentage), value


def mirrorable(method: str, path: str, shadow: ShadowConfig) -> str | None:
    """Why a request must not be mirrored, or None when it may be."""
    if method not in shadow.methods:
        return f"method {method} is not in shadow.methods"
    if not shadow.exclude_paths:
        return None
    # Backends may collapse // and resolve dot segments: judge the path they would see too.
    resolved = path if "//" not in path and "/." not in path else posixpath.normpath(
        re.sub("/{2,}", "/", path)) + ("/" if path.endswith("/") else "")
    for prefix in shadow.exclude_paths:
        if path.startswith(prefix) or resolved.startswith(prefix):
            return f"path under shadow.exclude_paths {prefix}"
    return None


def user_id(facts: Facts, routing: RoutingConfig) -> str | None:
    for source in routing.user_id:
        value: Any
        if source.kind == "header":
            value = facts.headers.get(source.name)
        elif source.kind == "cookie":
            value = facts.cookies.get(source.name)
        elif source.kind == "query":
            value = facts.query.get(source.name)
        else:
            value = facts.json_body.get(source.name) if facts.json_body is not None else None
            value = str(value) if isinstance(value, str | int) and not isinstance(
                value, bool) else None
        if value:
            return str(value)
    return None


def opt_choice(facts: Facts, routing: RoutingConfig) -> bool | None:
    value = facts.headers.get(routing.opt_header)
    if value is None:
        return None
    value = value.strip().lower()
    return True if value in OPT_IN else False if value in OPT_OUT else None


def under_rollout(path: str, routing: RoutingConfig) -> bool:
    paths = routing.paths
    if paths == ("/",):
        return True
    return any(path.startswith(prefix) for prefix in paths)


def decide(facts: Facts, routing: RoutingConfig, plan: Plan, chance: Callable[[], float],
           pinned: str | None = None, shadow: ShadowConfig | None = None) -> Decision:
    """Pick the primary backend; `chance()` draws in [0, 1) for sampling and anonymous users;
    `pinned` is the backend this request's session is pinned to, if any. With `shadow`, a
    mirror the request must not get (method, excluded path) is taken away, and said why."""
    decision = _pinned(facts, routing, plan, chance, pinned)
    if facts.websocket:
        decision.mirror = decision.fallback = False
    elif decision.mirror and shadow is not None:
        why = mirrorable(facts.method, facts.path, shadow)
        if why is not None:
            decision.mirror = False
            decision.skipped = "method" if why.startswith("method") else "excluded_path"
    return decision


def for_user(user: str, routing: RoutingConfig, plan: Plan) -> str:
    """The backend a request of this user (under routing.paths, no opt header, no pin)
    gets under `plan`: what `assign` prints and what a complaint by user id counts against."""
    facts = Facts("GET", routing.paths[0], {}, {}, {})
    return _decide(facts, routing, plan, lambda: 1.0, user).primary


def _pinned(facts: Facts, routing: RoutingConfig, plan: Plan, chance: Callable[[], float],
            pinned: str | None) -> Decision:
    uid = user_id(facts, routing)
    decision = _decide(facts, routing, plan, chance, uid)
    decision.user = uid
    if (pinned is None or pinned == decision.primary or plan.rolled_back or decision.gone
            or plan.phase in ("legacy", "shadow", "sunset")
            or decision.reason.startswith("opted")):
        return decision  # a rollback, sunset and the user's own opt header outrank a pin
    if decision.reason == "path outside routing.paths":
        return decision
    if pinned == "next_gen":
        return Decision("next_gen", False, plan.phase != "sunset", "session pinned", user=uid)
    return Decision("legacy", decision.mirror, False, "session pinned",
                    deprecated=plan.phase == "default", user=uid)


def _decide(facts: Facts, routing: RoutingConfig, plan: Plan,
            chance: Callable[[], float], uid: str | None) -> Decision:
    if not under_rollout(facts.path, routing):
        return Decision("legacy", False, False, "path outside routing.paths")
    phase = plan.phase
    if phase == "legacy":
        return Decision("legacy", False, False, "phase legacy")
    if phase == "shadow":
        return _legacy_mirrored(plan, chance, "phase shadow")
    opted = opt_choice(facts, routing) if phase in SERVES_OPT else None
    if phase == "default":
        if opted is False:
            return Decision("legacy", False, False, "opted out", deprecated=True)
        return Decision("next_gen", False, True, "phase default")
    if phase == "sunset":
        if opted is False:
            return Decision("legacy", False, False, "opted out after sunset", gone=True)
        return Decision("next_gen", False, False, "phase sunset")
    if opted is True:
        return Decision("next_gen", False, True, "opted in")
    if opted is False:
        return Decision("legacy", False, False, "opted out")
    return _by_user(uid, routing, plan, chance)


def _by_user(uid: str | None, routing: RoutingConfig, plan: Plan,
             chance: Callable[[], float]) -> Decision:
    if uid is None:
        if routing.anonymous == "random" and chance() * 100 < plan.percentage:
            return Decision("next_gen", False, True, "anonymous, drawn at random")
        return _legacy_mirrored(plan, chance, "anonymous")
    if plan.phase == "opt_in":
        return _legacy_mirrored(plan, chance, "not opted in")
    chosen, value = in_cohort(plan, uid)
    if chosen:
        return Decision("next_gen", False, True, "bucket under percentage", bucket=value)
    return _legacy_mirrored(plan, chance, "bucket over percentage", value)


def _legacy_mirrored(plan: Plan, chance: Callable[[], float], reason: str,
                     bucket_value: int | None = None) -> Decision:
    mirror = plan.phase in MIRRORS and plan.sample > 0 and (
        plan.sample >= 1 or chance() < plan.sample)
    return Decision("legacy", mirror, False, reason, bucket=bucket_value)
