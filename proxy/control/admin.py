"""The admin listener: health, readiness, metrics, status, and the authenticated changes.

Rules: every mutating call needs `Authorization: Bearer <token>` equal (constant-time) to the
token in `admin.token_env`; with no token configured, mutating calls are refused (403) rather
than open. The token is never logged nor forwarded.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.control.controller import Controller, Refused
from proxy.datapath.decide import for_user
from proxy.datapath.runtime import Runtime
from proxy.datapath.shadow import Shadow
from proxy.state.users import day_rates

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, indent=2),
                        content_type="application/json")


class Admin:
    def __init__(self, runtime: Runtime, control: Controller, shadow: Shadow,
                 token: Callable[[], str | None]) -> None:
        self.rt, self.control, self.shadow, self.token = runtime, control, shadow, token
        self.started = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/admin/status", self.status)
        for name, action in (("rollback", self.rollback), ("promote", self.promote),
                             ("percentage", self.percentage), ("pause", self.pause),
                             ("resume", self.resume), ("reset", self.reset),
                             ("complaints", self.complaints), ("feedback", self.feedback)):
            app.router.add_post(f"/admin/{name}", self.guarded(action))
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.rt.draining:
            return json_response(503, {"ready": False, "detail": "draining"})
        if not self.started:
            return json_response(503, {"ready": False, "detail": "starting"})
        body: dict[str, Any] = {"ready": True, "config_version": self.rt.config.version}
        if getattr(self.rt.store, "up", True) is False:
            body["detail"] = "state store unreachable: serving with the last known state"
        return json_response(200, body)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.rt.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        return json_response(200, status_document(self.rt, self.control, self.shadow))

    def guarded(self, action: Callable[[dict[str, Any], str], str]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            token = self.token()
            if not token:
                return json_response(403, {"error": "admin changes are disabled: no token is "
                                           f"configured; set ${self.rt.config.admin.token_env} "
                                           "(admin.token_env) in the proxy's environment"})
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"),
                                       f"Bearer {token}".encode()):
                return json_response(401, {"error": "missing or wrong bearer token"})
            try:
                body = await request.json() if request.can_read_body else {}
            except ValueError:
                return json_response(400, {"error": "the body must be a JSON object"})
            if not isinstance(body, dict):
                return json_response(400, {"error": "the body must be a JSON object"})
            by = str(body.get("by") or request.remote or "admin")[:100]
            try:
                with self.rt.store.locked():  # change the newest copy, lose nobody's change
                    self.control.sync_state()
                    message = action(body, by)
            except Refused as exc:
                return json_response(exc.status, {"error": str(exc)})
            return json_response(200, {"ok": True, "message": message,
                                       **plan_fields(self.rt)})
        return handler

    def rollback(self, body: dict[str, Any], by: str) -> str:
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise Refused(400, "reason: required, a short text saying why")
        percentage = number_field(body, "percentage", required=False)
        over = body.get("over_s")
        if over is not None and (isinstance(over, bool) or not isinstance(over, int | float)
                                 or not math.isfinite(over) or over < 0):
            raise Refused(400, f"over_s: must be a number of seconds >= 0, got {over!r}")
        self.control.rollback(reason.strip()[:500], by, percentage,
                              over_s=None if over is None else float(over))
        ramp = self.rt.stored.override.ramp_s if self.rt.stored.override else 0
        return ("rolled back" + (f" to {percentage:g} %" if percentage is not None else "")
                + (f" over {ramp:g} s" if ramp else ""))

    def promote(self, body: dict[str, Any], by: str) -> str:
        return self.control.promote(by)

    def percentage(self, body: dict[str, Any], by: str) -> str:
        value = number_field(body, "percentage", required=True)
        assert value is not None
        self.control.set_percentage(value, by, str(body.get("reason", ""))[:500])
        return f"percentage set to {value:g}"

    def pause(self, body: dict[str, Any], by: str) -> str:
        self.control.pause(by)
        return "schedule paused"

    def resume(self, body: dict[str, Any], by: str) -> str:
        self.control.resume(by)
        return "schedule resumed"

    def reset(self, body: dict[str, Any], by: str) -> str:
        self.control.reset(by)
        return "override dropped; following the YAML"

    def complaints(self, body: dict[str, Any], by: str) -> str:
        text = body.get("text")
        if not isinstance(text, str):
            raise Refused(400, "text: required")
        backend = self.attribute(body)
        self.control.complaint(backend)
        return f"complaint counted against {backend}"

    def attribute(self, body: dict[str, Any]) -> str:
        """The backend that served `request_id` (remembered), else the user's current one."""
        rid, user = body.get("request_id"), body.get("user_id")
        if rid is not None and not isinstance(rid, str):
            raise Refused(400, "request_id: must be a string")
        if user is not None and not isinstance(user, str):
            raise Refused(400, "user_id: must be a string")
        if rid and (backend := self.rt.served.get(rid)) is not None:
            return backend
        if user:
            return for_user(user, self.rt.config.routing, self.rt.plan)
        if rid:
            raise Refused(404, "request_id: not among the recent requests this proxy "
                          "remembers; send user_id too")
        raise Refused(400, "user_id or request_id: one is required")

    def feedback(self, body: dict[str, Any], by: str) -> str:
        score = body.get("score")
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
            raise Refused(400, f"score: must be a whole number from 1 to 5, got {score!r}")
        migrated = body.get("migrated")
        if migrated is not None and not isinstance(migrated, bool):
            raise Refused(400, f"migrated: must be true or false, got {migrated!r}")
        backend = self.attribute(body)
        self.control.feedback(backend, score, migrated)
        return f"feedback counted against {backend}"


def number_field(body: dict[str, Any], key: str, *, required: bool) -> float | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise Refused(400, f"{key}: must be a number between 0 and 100, got {value!r}")
    return float(value)


def plan_fields(rt: Runtime) -> dict[str, Any]:
    stored = rt.stored
    override = stored.override
    return {
        "phase": rt.plan.phase, "percentage": rt.plan.percentage, "paused": stored.paused,
        "override": None if override is None else {
            "action": override.action, "phase": override.phase,
            "percentage": override.percentage, "reason": override.reason, "by": override.by,
            "at": override.at},
    }


def status_document(rt: Runtime, control: Controller, shadow: Shadow) -> dict[str, Any]:
    config = rt.config
    schedule = config.rollout.schedule
    pending = schedule[rt.applied] if rt.applied < len(schedule) else None
    return {
        **plan_fields(rt),
        "reason": rt.stored.override.reason if rt.stored.override else None,
        "configured": {"phase": config.rollout.phase, "percentage": config.rollout.percentage},
        "backends": {name: rt.windows.figures(name).as_json() for name in config.backends},
        "window_s": config.guards.window_s,
        "guards": [v.as_json() for v in control.verdicts],
        "tripped": list(rt.stored.tripped),
        "circuit": {"next_gen": rt.breaker.state},
        "shadow": shadow_status(rt, shadow),
        "rollback_ramp": ramp_status(rt),
        "sessions_pinned": len(rt.pins),
        "feedback": feedback_status(rt),
        "users": users_status(rt),
        "schedule": {
            "applied": rt.applied, "steps": len(schedule),
            "next": None if pending is None else {
                "at": pending.at.isoformat(), "phase": pending.phase,
                "percentage": pending.percentage,
                "waiting": control.waiting_reason or "not due yet"},
        },
        "in_flight": rt.in_flight,
        "config_version": config.version,
        "config_loaded_at": config.loaded_at.isoformat().replace("+00:00", "Z"),
    }


def shadow_status(rt: Runtime, shadow: Shadow) -> dict[str, Any]:
    return {
        "sample": rt.config.shadow.sample, "in_flight": shadow.in_flight,
        "mirrored": describe_rules(rt), "budget": shadow.budget.status(),
        "noise": shadow.noise.status(),
    }


def describe_rules(rt: Runtime) -> dict[str, Any]:
    config, phase = rt.config.shadow, rt.plan.phase
    if phase not in ("shadow", "opt_in", "progressive"):
        why = f"phase {phase} mirrors nothing"
    elif config.sample <= 0:
        why = "shadow.sample is 0"
    else:
        why = f"{config.sample:.0%} of legacy-served requests"
    return {"what": why, "methods": sorted(config.methods),
            "never": {"methods": "every method not listed (side effects a copy must not "
                                 "repeat)",
                      "paths": list(config.exclude_paths)},
            "headers_added": dict(config.headers) | {"X-Rollout-Shadow": "1"}}


def ramp_status(rt: Runtime) -> dict[str, Any] | None:
    override = rt.stored.override
    if override is None or override.ramp_s <= 0:
        return None
    now = rt.clock()
    ramp = override.ramp(now)
    if ramp is None:
        return {"done": True, "target": override.percentage or 0.0}
    percentage, done = ramp
    return {"done": False, "from": override.ramp_from, "target": override.percentage or 0.0,
            "percentage": round(percentage, 3), "progress": round(done, 4),
            "eta_s": round(override.ramp_s * (1 - done), 1)}


def feedback_status(rt: Runtime) -> dict[str, Any]:
    scores = rt.stored.feedback
    result: dict[str, Any] = {}
    for backend, counts in scores.items():
        total = sum(counts.values())
        mean = sum(int(s) * n for s, n in counts.items()) / total if total else None
        result[backend] = {"count": total, "mean_score": None if mean is None
                           else round(mean, 3), "scores": dict(counts)}
    reports = rt.stored.migrations
    total = sum(reports.values())
    result["migration"] = {**reports, "success_rate": round(reports.get("success", 0) / total, 4)
                           if total else None}
    return result


def users_status(rt: Runtime) -> list[dict[str, Any]]:
    """Distinct users per backend per UTC day, adoption, and support tickets per user."""
    counted = {(day, backend): n for day, per in rt.stored.tickets.items()
               for backend, n in per.items()}
    rows = []
    for row in rt.users.days():
        tickets = day_rates(str(row["day"]), row, counted)
        rows.append({**row, "tickets": {"complaints": tickets["complaints"],
                                        "legacy_rate": tickets["legacy"],
                                        "next_gen_rate": tickets["next_gen"],
                                        "ratio": tickets["ratio"]}})
    return rows
