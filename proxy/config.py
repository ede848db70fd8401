"""The routing YAML as typed, frozen objects; every problem reported at once with its key path.

Rules: an unknown key is refused (with a did-you-mean), never accepted and ignored; relative
paths are relative to the config file's directory; `fallback.on` may be spelt `on:` (which
PyYAML reads as True) or `"on":`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.yamlsource import ConfigError, Problem, Section, load_yaml, suggest

PHASES = ("legacy", "shadow", "opt_in", "progressive", "default", "sunset")
BACKENDS = ("legacy", "next_gen")
FALLBACK_KINDS = ("connect_error", "timeout", "5xx")
USER_ID_KINDS = ("header", "cookie", "query", "json")

__all__ = ["PHASES", "Config", "ConfigError", "Problem", "load_config", "parse_config"]


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address
    token_env: str


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    url: str
    timeout_s: float
    connect_timeout_s: float
    max_connections: int
    headers: tuple[tuple[str, str], ...] = ()  # sent on every request to it, whatever its role


@dataclass(frozen=True, slots=True)
class ScheduleStep:
    at: datetime
    phase: str | None
    percentage: float | None


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    phase: str
    percentage: float
    salt: str
    sunset_date: datetime | None
    deprecation_date: datetime | None
    migration_url: str | None
    schedule: tuple[ScheduleStep, ...]
    rollback_over_s: float = 0.0


@dataclass(frozen=True, slots=True)
class UserIdSource:
    kind: str  # header | cookie | query | json
    name: str


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    user_id: tuple[UserIdSource, ...]
    opt_header: str
    anonymous: str
    paths: tuple[str, ...]
    bucketing: str = "murmur3"  # murmur3 | unleash
    session: UserIdSource | None = None
    session_ttl_s: float = 3600.0
    session_max: int = 100_000

    @property
    def reads_json(self) -> bool:
        return any(source.kind == "json" for source in self.user_id)


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    sample: float
    max_in_flight: int
    timeout_s: float
    ignore: tuple[str, ...]
    methods: frozenset[str] = frozenset({"GET", "HEAD", "POST"})
    exclude_paths: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    tokens_per_hour: float | None = None
    usd_per_hour: float | None = None
    baseline_sample: float = 0.0
    max_held_bytes: int = 64 * 2**20  # answers parked until their other half ends (shadow.py)


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    consecutive_failures: int
    error_rate: float
    window_s: float
    min_requests: int
    cooldown_s: float
    probes: int


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    enabled: bool
    on: frozenset[str]
    statuses: frozenset[int]
    attempts: int
    budget_ratio: float
    budget_window_s: float
    circuit: CircuitConfig


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int
    header_timeout_s: float
    max_in_flight: int
    trusted_hops: int
    drain_timeout_s: float
    max_header_bytes: int = 65536  # a backend's answer head (and its trailers), h1 rule 7


@dataclass(frozen=True, slots=True)
class Extract:
    """Where a figure is read from an answer: a header first, else a JSON path in the body."""

    header: str | None = None
    json: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    tokens: Extract
    success: Extract
    memory: Extract
    trace_file: Path | None
    trace_max_bytes: int
    trace_keep: int
    json_max_bytes: int
    usd_per_1k_tokens: dict[str, float] = field(default_factory=dict)
    active_users_days: int = 90
    capture: CaptureConfig | None = None


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    file: Path
    per_pattern: int
    max_body_bytes: int
    redact: frozenset[str]
    max_patterns: int


@dataclass(frozen=True, slots=True)
class GuardsConfig:
    window_s: float
    min_requests: int
    error_rate: float | None
    latency_degradation: float | None
    memory_spike: float | None
    max_tokens: float | None
    max_time_ms: float | None
    complaints_per_hour: float | None
    action: str
    webhook: str | None


@dataclass(frozen=True, slots=True)
class StateConfig:
    backend: str
    path: Path
    redis_url: str | None


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address
    admin: AdminConfig
    backends: dict[str, BackendConfig]
    rollout: RolloutConfig
    routing: RoutingConfig
    shadow: ShadowConfig
    fallback: FallbackConfig
    limits: LimitsConfig
    telemetry: TelemetryConfig
    guards: GuardsConfig
    state: StateConfig
    source: Path | None = None
    version: str = ""
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; ConfigError lists every problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {path}: {exc.strerror}")]) from exc
    return parse_config(data, base=path.resolve().parent, source=path)


def parse_config(data: bytes | str, *, base: Path | None = None,
                 source: Path | None = None) -> Config:
    raw = data.encode() if isinstance(data, str) else data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", "not UTF-8 text")]) from exc
    problems: list[Problem] = []
    top = Section(load_yaml(text), "", problems)
    base = base or Path.cwd()
    config = Config(
        listen=address(top, "listen", "0.0.0.0:8080"),
        admin=read_admin(top.section("admin")),
        backends=read_backends(top.section("backends")),
        rollout=read_rollout(top.section("rollout")),
        routing=read_routing(top.section("routing")),
        shadow=read_shadow(top.section("shadow")),
        fallback=read_fallback(top.section("fallback")),
        limits=read_limits(top.section("limits")),
        telemetry=read_telemetry(top.section("telemetry"), base),
        guards=read_guards(top.section("guards")),
        state=read_state(top.section("state"), base),
        source=source,
        version=hashlib.sha256(raw).hexdigest()[:12],
    )
    top.close(["listen", "admin", "backends", "rollout", "routing", "shadow", "fallback",
               "limits", "telemetry", "guards", "state"])
    if problems:
        raise ConfigError(problems)
    return config


def address(section: Section, key: str, default: str) -> Address:
    value = section.text(key, default) or default
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        section.report(key, f"must be HOST:PORT, got {value!r}")
        host, _, port = default.rpartition(":")
    return Address(host.strip("[]") or "0.0.0.0", int(port))


def read_admin(s: Section) -> AdminConfig:
    result = AdminConfig(address(s, "listen", "127.0.0.1:9090"),
                         s.text("token_env", "ROLLOUT_ADMIN_TOKEN") or "ROLLOUT_ADMIN_TOKEN")
    s.close(["listen", "token_env"])
    return result


def read_backends(s: Section) -> dict[str, BackendConfig]:
    backends = {}
    for name in BACKENDS:
        if not s.has(name):
            s.report("", f"missing backend {name!r}")
            continue
        backends[name] = read_backend(s.section(name), name)
    s.close(BACKENDS)
    return backends


def read_backend(s: Section, name: str) -> BackendConfig:
    url = s.text("url", None)
    if url is None:
        s.report("url", "is required, e.g. http://127.0.0.1:8001")
    elif urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        s.report("url", f"must be an http:// or https:// URL, got {url!r}")
    result = BackendConfig(
        name=name, url=(url or "http://127.0.0.1").rstrip("/"),
        timeout_s=s.number("timeout_s", 60, low=0, low_open=True) or 60,
        connect_timeout_s=s.number("connect_timeout_s", 5, low=0, low_open=True) or 5,
        max_connections=int(s.number("max_connections", 10_000, low=1, integer=True)
                            or 10_000),
        headers=header_map(s, "headers"),
    )
    s.close(["url", "timeout_s", "connect_timeout_s", "max_connections", "headers"])
    return result


def header_map(s: Section, key: str) -> tuple[tuple[str, str], ...]:
    raw = s.raw(key, {}) or {}
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str | int | float) and not isinstance(
                v, bool) for k, v in raw.items()):
        s.report(key, f"must map header names to values, got {raw!r}")
        return ()
    pairs = tuple((k, str(v)) for k, v in raw.items())
    for name, value in pairs:
        if not name.isascii() or any(c in name for c in " :\r\n") or any(
                c in value for c in "\r\n"):
            s.report(key, f"header {name!r} is not a valid header line")
    return pairs


def read_rollout(s: Section) -> RolloutConfig:
    result = RolloutConfig(
        phase=s.choice("phase", "legacy", PHASES),
        percentage=s.number("percentage", 0, low=0, high=100) or 0.0,
        salt=str(s.raw("salt", "rollout")),
        sunset_date=moment(s, "sunset_date"),
        deprecation_date=moment(s, "deprecation_date"),
        migration_url=s.text("migration_url", None),
        schedule=read_schedule(s),
        rollback_over_s=s.number("rollback_over_s", 0, low=0) or 0.0,
    )
    if result.sunset_date and result.deprecation_date and (
            result.sunset_date < result.deprecation_date):
        s.report("sunset_date", "must not be before rollout.deprecation_date (RFC 8594)")
    s.close(["phase", "percentage", "salt", "sunset_date", "deprecation_date",
             "migration_url", "schedule", "rollback_over_s"])
    return result


def moment(s: Section, key: str) -> datetime | None:
    value = s.raw(key)
    if value is None:
        return None
    parsed = to_datetime(value)
    if parsed is None:
        s.report(key, f"must be a date or RFC 3339 time, got {value!r}")
    return parsed


def to_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def read_schedule(s: Section) -> tuple[ScheduleStep, ...]:
    steps = s.raw("schedule") or []
    if not isinstance(steps, list):
        s.report("schedule", "must be a list of {at, phase?, percentage?}")
        return ()
    result = []
    for index, raw in enumerate(steps):
        step = Section(raw, f"{s.key_path('schedule')}[{index}]", s.problems, s.line_of("schedule"))
        at = moment(step, "at")
        if at is None and not step.has("at"):
            step.report("at", "is required")
        phase = step.choice("phase", "legacy", PHASES) if step.has("phase") else None
        pct = step.number("percentage", None, low=0, high=100)
        if phase is None and pct is None:
            step.report("", "a step needs a phase, a percentage or both")
        step.close(["at", "phase", "percentage"])
        if at is not None:
            result.append(ScheduleStep(at, phase, pct))
    return tuple(sorted(result, key=lambda step: step.at))


def read_routing(s: Section) -> RoutingConfig:
    result = RoutingConfig(
        user_id=read_user_id(s),
        opt_header=s.text("opt_header", "X-Next-Gen") or "X-Next-Gen",
        anonymous=s.choice("anonymous", "legacy", ("legacy", "random")),
        paths=read_paths(s),
        bucketing=s.choice("bucketing", "murmur3", ("murmur3", "unleash")),
        session=read_session(s),
        session_ttl_s=s.number("session_ttl_s", 3600, low=0, low_open=True) or 3600,
        session_max=int(s.number("session_max", 100_000, low=1, integer=True) or 100_000),
    )
    s.close(["user_id", "opt_header", "anonymous", "paths", "bucketing", "session",
             "session_ttl_s", "session_max"])
    return result


def read_user_id(s: Section) -> tuple[UserIdSource, ...]:
    raw = s.raw("user_id", [{"header": "X-User-Id"}])
    if not isinstance(raw, list):
        raw = [raw]
    sources = []
    for index, item in enumerate(raw):
        path = f"{s.key_path('user_id')}[{index}]"
        if not (isinstance(item, dict) and len(item) == 1):
            s.problems.append(Problem(path, "must be one of {header: NAME}, {cookie: NAME}, "
                                      f"{{query: NAME}}, {{json: FIELD}}, got {item!r}",
                                      s.line_of("user_id")))
            continue
        ((kind, name),) = item.items()
        if kind not in USER_ID_KINDS or not isinstance(name, str) or not name:
            s.problems.append(Problem(path, f"unknown source {kind!r}"
                                      f"{suggest(kind, USER_ID_KINDS)}", s.line_of("user_id")))
            continue
        sources.append(UserIdSource(str(kind), name))
    return tuple(sources)


def read_session(s: Section) -> UserIdSource | None:
    raw = s.raw("session")
    if raw is None:
        return None
    if not (isinstance(raw, dict) and len(raw) == 1):
        s.report("session", f"must be {{header: NAME}} or {{cookie: NAME}}, got {raw!r}")
        return None
    ((kind, name),) = raw.items()
    if kind not in ("header", "cookie") or not isinstance(name, str) or not name:
        s.report("session", f"must be {{header: NAME}} or {{cookie: NAME}}, got {raw!r}")
        return None
    return UserIdSource(str(kind), name)


def read_paths(s: Section, key: str = "paths", default: tuple[str, ...] = ("/",)
               ) -> tuple[str, ...]:
    raw = s.raw(key, list(default))
    if not isinstance(raw, list) or not all(isinstance(p, str) and p.startswith("/") for p in raw):
        s.report(key, f"must be a list of path prefixes starting with '/', got {raw!r}")
        return default
    return tuple(raw)


def read_shadow(s: Section) -> ShadowConfig:
    compare = s.section("compare")
    ignore = compare.raw("ignore", []) or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        compare.report("ignore", f"must be a list of JSON paths, got {ignore!r}")
        ignore = []
    baseline = compare.number("baseline_sample", 0.0, low=0, high=1) or 0.0
    compare.close(["ignore", "baseline_sample"])
    budget = s.section("budget")
    tokens_per_hour = budget.number("tokens_per_hour", None, low=0)
    usd_per_hour = budget.number("usd_per_hour", None, low=0)
    budget.close(["tokens_per_hour", "usd_per_hour"])
    methods = s.raw("methods", ["GET", "HEAD", "POST"])
    if not isinstance(methods, list) or not all(isinstance(m, str) and m for m in methods):
        s.report("methods", f"must be a list of HTTP methods, got {methods!r}")
        methods = ["GET", "HEAD", "POST"]
    result = ShadowConfig(
        sample=s.number("sample", 1.0, low=0, high=1) or 0.0,
        max_in_flight=int(s.number("max_in_flight", 256, low=0, integer=True) or 0),
        timeout_s=s.number("timeout_s", 60, low=0, low_open=True) or 60,
        ignore=tuple(ignore),
        methods=frozenset(m.upper() for m in methods),
        exclude_paths=read_paths(s, "exclude_paths", ()),
        headers=header_map(s, "headers"),
        tokens_per_hour=tokens_per_hour, usd_per_hour=usd_per_hour,
        baseline_sample=baseline,
        max_held_bytes=int(s.number("max_held_bytes", 64 * 2**20, low=0, integer=True) or 0),
    )
    s.close(["sample", "max_in_flight", "timeout_s", "compare", "methods", "exclude_paths",
             "headers", "budget", "max_held_bytes"])
    return result


def read_fallback(s: Section) -> FallbackConfig:
    raw_on = s.raw("on", ["connect_error", "timeout", "5xx"])
    kinds, statuses = read_fallback_on(s, raw_on)
    circuit = read_circuit(s.section("circuit"))
    result = FallbackConfig(
        enabled=s.flag("enabled", True),
        on=kinds, statuses=statuses,
        attempts=int(s.number("attempts", 1, low=1, high=10, integer=True) or 1),
        budget_ratio=s.number("budget_ratio", 0.2, low=0, high=1) or 0.0,
        budget_window_s=s.number("budget_window_s", 10, low=0, low_open=True) or 10,
        circuit=circuit,
    )
    s.close(["enabled", "on", "attempts", "budget_ratio", "budget_window_s", "circuit"])
    return result


def read_fallback_on(s: Section, raw: Any) -> tuple[frozenset[str], frozenset[int]]:
    if not isinstance(raw, list):
        s.report("on", f"must be a list such as [connect_error, timeout, 5xx, 429], got {raw!r}")
        return frozenset(FALLBACK_KINDS), frozenset()
    kinds, statuses = set(), set()
    for item in raw:
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            statuses.add(item)
        elif item in FALLBACK_KINDS:
            kinds.add(str(item))
        else:
            s.report("on", f"unknown failure kind {item!r}{suggest(item, FALLBACK_KINDS)}; "
                     "use connect_error, timeout, 5xx or a status code")
    return frozenset(kinds), frozenset(statuses)


def read_circuit(s: Section) -> CircuitConfig:
    result = CircuitConfig(
        consecutive_failures=int(s.number("consecutive_failures", 5, low=1, integer=True) or 5),
        error_rate=s.number("error_rate", 0.5, low=0, high=1, low_open=True) or 0.5,
        window_s=s.number("window_s", 10, low=0, low_open=True) or 10,
        min_requests=int(s.number("min_requests", 20, low=1, integer=True) or 20),
        cooldown_s=s.number("cooldown_s", 30, low=0, low_open=True) or 30,
        probes=int(s.number("probes", 3, low=1, integer=True) or 3),
    )
    s.close(["consecutive_failures", "error_rate", "window_s", "min_requests", "cooldown_s",
             "probes"])
    return result


def read_limits(s: Section) -> LimitsConfig:
    result = LimitsConfig(
        max_body_bytes=int(s.number("max_body_bytes", 10_485_760, low=0, integer=True) or 0),
        header_timeout_s=s.number("header_timeout_s", 10, low=0, low_open=True) or 10,
        max_in_flight=int(s.number("max_in_flight", 10_000, low=1, integer=True) or 10_000),
        trusted_hops=int(s.number("trusted_hops", 0, low=0, integer=True) or 0),
        drain_timeout_s=s.number("drain_timeout_s", 30, low=0) or 0.0,
        max_header_bytes=int(s.number("max_header_bytes", 65536, low=1024, integer=True)
                             or 65536),
    )
    s.close(["max_body_bytes", "header_timeout_s", "max_in_flight", "trusted_hops",
             "drain_timeout_s", "max_header_bytes"])
    return result


def read_extract(s: Section, key: str, default: Extract) -> Extract:
    if not s.has(key):
        return default
    sub = s.section(key)
    if sub.data == {} and s.raw(key) is None:
        return Extract()
    json_path = sub.text("json", None)
    result = Extract(header=sub.text("header", None),
                     json=tuple(json_path.split(".")) if json_path else None)
    sub.close(["header", "json"])
    return result


def read_telemetry(s: Section, base: Path) -> TelemetryConfig:
    trace = s.text("trace_file", "traces/comparisons.jsonl")
    result = TelemetryConfig(
        tokens=read_extract(s, "tokens", Extract("X-Tokens-Used", ("usage", "total_tokens"))),
        success=read_extract(s, "success", Extract(json=("success",))),
        memory=read_extract(s, "memory", Extract("X-Memory-MB")),
        trace_file=(base / trace) if trace else None,
        trace_max_bytes=int(s.number("trace_max_bytes", 100 * 2**20, low=1024, integer=True)
                            or 100 * 2**20),
        trace_keep=int(s.number("trace_keep", 5, low=0, integer=True) or 0),
        json_max_bytes=int(s.number("json_max_bytes", 1 * 2**20, low=0, integer=True) or 0),
        usd_per_1k_tokens=read_cost(s.section("cost")),
        active_users_days=read_active_users(s.section("active_users")),
        capture=read_capture(s, base),
    )
    s.close(["tokens", "success", "memory", "trace_file", "trace_max_bytes", "trace_keep",
             "json_max_bytes", "cost", "active_users", "capture"])
    return result


def read_cost(s: Section) -> dict[str, float]:
    prices = {}
    for name in BACKENDS:
        if s.has(name):
            backend = s.section(name)
            prices[name] = backend.number("usd_per_1k_tokens", 0.0, low=0) or 0.0
            backend.close(["usd_per_1k_tokens"])
    s.close(BACKENDS)
    return prices


def read_active_users(s: Section) -> int:
    days = int(s.number("days", 90, low=1, high=3660, integer=True) or 90)
    s.close(["days"])
    return days


def read_capture(s: Section, base: Path) -> CaptureConfig | None:
    if s.raw("capture") is None:
        return None
    c = s.section("capture")
    file = c.text("file", None)
    if not file:
        c.report("file", "is required, e.g. captures/patterns.jsonl")
    redact = c.raw("redact", ["password", "token", "api_key", "secret"]) or []
    if not isinstance(redact, list) or not all(isinstance(r, str) for r in redact):
        c.report("redact", f"must be a list of JSON field names, got {redact!r}")
        redact = []
    result = CaptureConfig(
        file=base / (file or "captures/patterns.jsonl"),
        per_pattern=int(c.number("per_pattern", 3, low=0, integer=True) or 0),
        max_body_bytes=int(c.number("max_body_bytes", 65536, low=0, integer=True) or 0),
        redact=frozenset(r.lower() for r in redact),
        # 1,000 patterns x 3 samples x 64 KiB bounds capture near 200 MB at worst.
        max_patterns=int(c.number("max_patterns", 1_000, low=1, integer=True) or 1_000),
    )
    c.close(["file", "per_pattern", "max_body_bytes", "redact", "max_patterns"])
    return result


def read_guards(s: Section) -> GuardsConfig:
    def limit(key: str, default: float | None) -> float | None:
        return s.number(key, default, low=0)

    result = GuardsConfig(
        window_s=s.number("window_s", 300, low=0, low_open=True) or 300,
        min_requests=int(s.number("min_requests", 50, low=1, integer=True) or 50),
        error_rate=s.number("error_rate", 0.05, low=0, high=1),
        latency_degradation=limit("latency_degradation", 0.20),
        memory_spike=limit("memory_spike", 2.0),
        max_tokens=limit("max_tokens", 20000),
        max_time_ms=limit("max_time_ms", None),
        complaints_per_hour=limit("complaints_per_hour", 10),
        action=s.choice("action", "rollback", ("rollback", "alert")),
        webhook=s.text("webhook", None),
    )
    if result.webhook and urlsplit(result.webhook).scheme not in ("http", "https"):
        s.report("webhook", f"must be an http(s) URL, got {result.webhook!r}")
    s.close(["window_s", "min_requests", "error_rate", "latency_degradation", "memory_spike",
             "max_tokens", "max_time_ms", "complaints_per_hour", "action", "webhook"])
    return result


def read_state(s: Section, base: Path) -> StateConfig:
    result = StateConfig(
        backend=s.choice("backend", "file", ("file", "redis")),
        path=base / (s.text("path", "state/rollout-state.json") or "state/rollout-state.json"),
        redis_url=s.text("redis_url", None),
    )
    if result.backend == "redis" and not result.redis_url:
        s.report("redis_url", "is required with state.backend: redis, e.g. redis://127.0.0.1:6379/0")
    elif result.redis_url and urlsplit(result.redis_url).scheme not in ("redis", "rediss", "unix"):
        s.report("redis_url", f"must be a redis:// URL, got {result.redis_url!r}")
    s.close(["backend", "path", "redis_url"])
    return result
