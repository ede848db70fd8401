"""The `rollout-proxy` command: serve, demo, check, assign, the admin verbs, report, compare.

Output is built by pure `format_*` functions; the verbs only print them.
Exit codes: 0 success, 1 refusal or problems, 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.config.loading import load_config
from proxy.config.model import Config, ConfigError
from proxy.datapath.decide import Plan, bucket, for_user, unleash_value
from proxy.offline import replay, report
from proxy.state.store import FileStore, Stored, due_steps, effective

DEFAULT_ADMIN = "http://127.0.0.1:9090"


class JsonLines(logging.Formatter):
    """One JSON object per line: our events already are; anything else is wrapped."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.startswith("{"):
            message = json.dumps({"event": "log", "level": record.levelname.lower(),
                                  "logger": record.name, "message": message})
        if record.exc_info:
            message = message[:-1] + ", " + json.dumps(
                {"exception": self.formatException(record.exc_info)})[1:]
        return message


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def stored_state(config: Config) -> Stored:
    try:
        return FileStore(config.state.path).load()
    except ValueError:
        return Stored()


def plan_of(config: Config) -> tuple[str, float, int]:
    stored = stored_state(config)
    applied = due_steps(config.rollout.schedule, stored, datetime.now(UTC))
    phase, percentage = effective(config.rollout, stored, applied, datetime.now(UTC))
    return phase, percentage, applied


def format_problems(error: ConfigError, path: str) -> str:
    lines = [f"{path}: {len(error.problems)} problem(s), the config is refused:"]
    lines += [f"  {problem}" for problem in error.problems]
    return "\n".join(lines)


def format_plan(config: Config) -> str:
    phase, percentage, applied = plan_of(config)
    r, ro, sh, fb = config.routing, config.rollout, config.shadow, config.fallback
    sources = ", ".join(f"{s.kind} {s.name}" for s in r.user_id) or "none"
    on = sorted(fb.on) + [str(s) for s in sorted(fb.statuses)]
    lines = [
        f"config {config.source} (version {config.version}) is valid",
        f"phase:       {phase}" + (f" (YAML: {ro.phase})" if phase != ro.phase else ""),
        f"percentage:  {percentage:g} %" + (
            f" (YAML: {ro.percentage:g})" if percentage != ro.percentage else "")
        + f"  salt {ro.salt!r}",
        f"listen:      {config.listen}   admin: {config.admin.listen} "
        f"(token from ${config.admin.token_env})",
    ]
    for b in config.backends.values():
        lines.append(f"backend:     {b.name} {b.url} (timeout {b.timeout_s:g} s)")
        lines += [f"  header:    {name}: {value} (on every request to {b.name})"
                  for name, value in b.headers]
    lines += [
        f"paths:       {', '.join(r.paths)} (others go to legacy)",
        f"user id:     {sources}; anonymous -> {r.anonymous}; opt header {r.opt_header}",
        f"cohort:      {r.bucketing}"
        + (f"; sessions pinned by {r.session.kind} {r.session.name} for "
           f"{r.session_ttl_s:g} s" if r.session else "; no session pinning"),
        f"mirroring:   {describe_mirroring(phase, sh.sample)}"
        f" (max {sh.max_in_flight} in flight, timeout {sh.timeout_s:g} s)",
        f"  mirrored:  methods {', '.join(sorted(sh.methods))}; never: other methods"
        + (f", paths under {', '.join(sh.exclude_paths)}" if sh.exclude_paths else "")
        + " (side effects a copy must not repeat)",
        "  copies:    X-Rollout-Shadow: 1" + "".join(f", {n}: {v}" for n, v in sh.headers),
        f"fallback:    {'on ' + ', '.join(on) if fb.enabled else 'off'}, {fb.attempts} "
        f"attempt(s), budget {fb.budget_ratio:.0%}"
        + ("; none in sunset" if phase == "sunset" else ""),
        f"guards:      window {config.guards.window_s:g} s, min {config.guards.min_requests} "
        f"answers, action {config.guards.action}",
        f"state:       {config.state.backend} {config.state.path}",
        f"trace:       {config.telemetry.trace_file or 'off'}",
    ]
    for index, step in enumerate(ro.schedule):
        mark = "applied" if index < applied else "pending"
        what = " ".join(filter(None, [step.phase, f"{step.percentage:g} %"
                                      if step.percentage is not None else None]))
        lines.append(f"schedule:    {step.at.isoformat()} {what} ({mark})")
    return "\n".join(lines)


def describe_mirroring(phase: str, sample: float) -> str:
    if phase not in ("shadow", "opt_in", "progressive"):
        return f"nothing (phase {phase} mirrors nothing)"
    if sample <= 0:
        return "nothing (shadow.sample is 0)"
    return f"{sample:.0%} of legacy-served requests to next_gen"


def format_assign(config: Config, users: list[str]) -> str:
    """Both bucket values: murmur3 (0..9999) and Unleash's normalizedValue (1..100); the
    backend is routing.for_user's, the handler's own decision."""
    phase, percentage, _ = plan_of(config)
    salt, bucketing = config.rollout.salt, config.routing.bucketing
    plan = Plan(phase, percentage, salt, config.shadow.sample, bucketing)
    lines = []
    for user in users:
        value, unleash = bucket(salt, user), unleash_value(salt, user)
        backend = for_user(user, config.routing, plan)
        lines.append(f"{user}  bucket {value}  unleash {unleash}  {backend}  "
                     f"(phase {phase}, {percentage:g} %, bucketing {bucketing})")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(format_problems(exc, args.config), file=sys.stderr)
        return 1
    print(format_plan(config))
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(format_problems(exc, args.config), file=sys.stderr)
        return 1
    print(format_assign(config, args.users))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.app import serve
    from proxy.workers import MULTIPROC_ENV, WORKER_ENV, supervise

    setup_logging()
    try:
        load_config(args.config)
    except ConfigError as exc:
        print(format_problems(exc, args.config), file=sys.stderr)
        return 1
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    index = os.environ.get(WORKER_ENV)
    if args.workers > 1 and index is None:
        return supervise(Path(args.config), args.workers, ("--transport", args.transport))
    result: int = uvloop.run(serve(Path(args.config), worker=int(index or 0),
                                   multiprocess_dir=os.environ.get(MULTIPROC_ENV),
                                   reuse_port=index is not None, transport=args.transport))
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.offline.demo import run_demo

    setup_logging()
    return run_demo(args.speed)


# The admin client ---------------------------------------------------------------------------


def admin_url(args: argparse.Namespace) -> str:
    if args.admin_url:
        return str(args.admin_url).rstrip("/")
    if os.environ.get("ROLLOUT_ADMIN_URL"):
        return os.environ["ROLLOUT_ADMIN_URL"].rstrip("/")
    if args.config:
        try:
            listen = load_config(args.config).admin.listen
        except ConfigError:
            return DEFAULT_ADMIN
        host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host
        return f"http://{host}:{listen.port}"
    return DEFAULT_ADMIN


def call_admin(args: argparse.Namespace, method: str, path: str,
               body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body or {}).encode() if method == "POST" else None
    request = urllib.request.Request(admin_url(args) + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    token = os.environ.get("ROLLOUT_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": exc.reason}
    except (urllib.error.URLError, OSError) as exc:
        return 0, {"error": f"cannot reach the admin API at {admin_url(args)}: {exc}"}


def format_status(status: dict[str, Any]) -> str:
    override = status.get("override")
    lines = [
        f"phase        {status.get('phase')}   percentage {status.get('percentage'):g} %"
        f"   paused {'yes' if status.get('paused') else 'no'}",
        f"configured   {status['configured']['phase']} {status['configured']['percentage']:g} %",
        "override     " + ("none" if not override else
                           f"{override['action']} by {override['by']} at {override['at']}: "
                           f"{override['reason']}"),
        f"circuit      next_gen {status.get('circuit', {}).get('next_gen')}",
        f"config       {status.get('config_version')} loaded {status.get('config_loaded_at')}",
        "",
        f"{'backend':<10} {'requests':>9} {'errors':>7} {'p50 ms':>9} {'p95 ms':>9} "
        f"{'tokens':>9} {'mem MB':>8}",
    ]
    for name, f in status.get("backends", {}).items():
        lines.append(f"{name:<10} {f['requests']:>9} {f['error_rate']:>7.1%} "
                     f"{num(f['p50_ms']):>9} {num(f['p95_ms']):>9} {num(f['mean_tokens']):>9} "
                     f"{num(f['mean_memory_mb']):>8}")
    lines.append("")
    for guard in status.get("guards", []):
        lines.append(f"guard {guard['guard']:<20} {guard['state']:<8} {guard['detail']}")
    step = status.get("schedule", {}).get("next")
    if step:
        lines.append(f"next step    {step['at']} {step.get('phase') or ''} "
                     f"{step.get('percentage') if step.get('percentage') is not None else ''}"
                     f" — waiting: {step['waiting']}")
    return "\n".join(lines)


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_admin(args: argparse.Namespace, method: str, path: str,
              body: dict[str, Any] | None = None) -> int:
    code, answer = call_admin(args, method, path, body)
    if code != 200:
        print(f"refused ({code or 'unreachable'}): {answer.get('error', answer)}",
              file=sys.stderr)
        return 1
    if path == "/admin/status":
        print(json.dumps(answer, indent=2) if args.json else format_status(answer))
    else:
        print(f"{answer.get('message', 'ok')} — now phase {answer.get('phase')}, "
              f"{answer.get('percentage'):g} %")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return watch(args, until_done=False)
    return run_admin(args, "GET", "/admin/status")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1h`, `1h30m` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    total, number = 0.0, ""
    for char in text.strip().lower():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total, number = total + float(number) * units[char], ""
        else:
            raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 1h)")
    if number:
        total += float(number)
    return total


def cmd_rollback(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": args.reason}
    if args.version not in (None, "stable"):
        print(f"--version: only 'stable' (legacy) is known, got {args.version!r}",
              file=sys.stderr)
        return 2
    if args.percentage is not None and args.version is None:
        body["percentage"] = args.percentage
    if args.over is not None:
        body["over_s"] = args.over
    code = run_admin(args, "POST", "/admin/rollback", body)
    if code == 0 and args.monitor:
        return watch(args, until_done=True)
    return code


def format_watch_line(status: dict[str, Any]) -> str:
    ramp = status.get("rollback_ramp") or {}
    tripped = status.get("tripped") or []
    parts = [f"phase {status.get('phase')}", f"{status.get('percentage', 0):.2f} %"]
    if ramp and not ramp.get("done"):
        parts.append(f"ramp {ramp['progress']:.0%} eta {ramp['eta_s']:.0f} s")
    figures = status.get("backends", {}).get("next_gen", {})
    parts.append(f"next_gen errors {figures.get('error_rate', 0):.1%}")
    parts.append("guards tripped: " + ", ".join(tripped) if tripped else "guards ok")
    return "  ".join(parts)


def watch(args: argparse.Namespace, *, until_done: bool) -> int:
    """Print the status every 2 s (in place on a terminal). `until_done`: stop once the
    rollback has landed. Otherwise exit 0 on Ctrl-C while healthy, 1 once a guard fired."""
    import time

    tty = sys.stdout.isatty()
    try:
        while True:
            code, status = call_admin(args, "GET", "/admin/status")
            if code != 200:
                print(f"refused ({code or 'unreachable'}): {status.get('error')}",
                      file=sys.stderr)
                return 1
            line = format_watch_line(status)
            print(("\r\x1b[K" + line) if tty else line, end="" if tty else "\n", flush=True)
            if status.get("tripped") and not until_done:
                print()
                return 1
            ramp = status.get("rollback_ramp")
            if until_done and (ramp is None or ramp.get("done")):
                print("\nrollback complete" if tty else "rollback complete")
                return 0
            time.sleep(2)
    except KeyboardInterrupt:
        print()
        return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"score": args.score}
    if args.user_id:
        body["user_id"] = args.user_id
    if args.request_id:
        body["request_id"] = args.request_id
    if args.migrated is not None:
        body["migrated"] = args.migrated == "yes"
    return run_admin(args, "POST", "/admin/feedback", body)


def cmd_simple(path: str) -> Any:
    return lambda args: run_admin(args, "POST", path)


def cmd_set_percentage(args: argparse.Namespace) -> int:
    return run_admin(args, "POST", "/admin/percentage", {"percentage": args.percentage})


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rollout-proxy", description=__doc__)
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    serve = verbs.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--transport", choices=("h1", "aiohttp"), default="h1",
                       help="the HTTP client that speaks to the backends: h1 (the lean "
                            "one, default) or aiohttp's (to compare them)")
    serve.set_defaults(func=cmd_serve)
    demo = verbs.add_parser("demo", help="simulated backends with the proxy in front")
    demo.add_argument("--speed", type=float, default=10.0,
                      help="divide the simulated task times by this (default 10)")
    demo.set_defaults(func=cmd_demo)
    check = verbs.add_parser("check", help="validate a config, print the effective plan")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check)
    assign = verbs.add_parser("assign", help="bucket and backend of each user")
    assign.add_argument("--config", required=True)
    assign.add_argument("users", nargs="+", metavar="USER_ID")
    assign.set_defaults(func=cmd_assign)
    admin_verbs = [
        ("status", "the rollout's state", cmd_status),
        ("rollback", "send traffic back to legacy", cmd_rollback),
        ("promote", "apply the next step", cmd_simple("/admin/promote")),
        ("set-percentage", "set the rollout percentage", cmd_set_percentage),
        ("pause", "hold the schedule", cmd_simple("/admin/pause")),
        ("resume", "follow the schedule again", cmd_simple("/admin/resume")),
        ("reset", "drop the runtime override", cmd_simple("/admin/reset")),
        ("feedback", "record a user's score (1..5)", cmd_feedback),
    ]
    for name, help_text, func in admin_verbs:
        verb = verbs.add_parser(name, help=help_text)
        verb.add_argument("--admin-url", help="default $ROLLOUT_ADMIN_URL, else the config's "
                          "admin.listen, else " + DEFAULT_ADMIN)
        verb.add_argument("--config", help="read admin.listen from this config")
        verb.set_defaults(func=func)
        if name == "status":
            verb.add_argument("--json", action="store_true")
            verb.add_argument("--watch", action="store_true",
                              help="print every 2 s; exit 0 while healthy, 1 once a guard fired")
        if name == "rollback":
            verb.add_argument("--reason", required=True)
            verb.add_argument("--percentage", type=float, help="roll back to N %% (default: "
                              "all traffic to legacy)")
            verb.add_argument("--version", help="'stable': all traffic to legacy")
            verb.add_argument("--over", type=parse_duration, metavar="DURATION",
                              help="step the percentage down over this long, e.g. 10m")
            verb.add_argument("--monitor", action="store_true",
                              help="then print the status every 2 s until it is complete")
        if name == "feedback":
            verb.add_argument("--score", type=int, required=True, choices=range(1, 6))
            verb.add_argument("--user-id")
            verb.add_argument("--request-id")
            verb.add_argument("--migrated", choices=("yes", "no"))
        if name == "set-percentage":
            verb.add_argument("percentage", type=float)
    report.register(verbs)
    replay.register(verbs)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
