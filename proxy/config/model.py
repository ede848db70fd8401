"""The routing YAML as typed, frozen objects; every problem reported at once with its key path.

Rules: each section is read by its table of fields below (key, type, default, bounds, doc),
the one place its keys and defaults are written (proxy/config/fields.py); an unknown key is
refused with a did-you-mean, never accepted and ignored; relative paths are relative to the
config file's directory; `fallback.on` may be spelt `on:` (which PyYAML reads as True) or
`"on":`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from proxy.config.fields import (
    REQUIRED,
    Field,
    due,
    header_map,
    http_url,
    moment,
    only_value,
    path_prefixes,
    read_fields,
    read_section,
    strings,
    to_datetime,
)
from proxy.config.yamlsource import ConfigError, Problem, Section, load_yaml, suggest

PHASES = ("legacy", "shadow", "opt_in", "progressive", "default", "sunset")
BACKENDS = ("legacy", "next_gen")
FALLBACK_KINDS = ("connect_error", "timeout", "5xx")
USER_ID_KINDS = ("header", "cookie", "query", "json")

__all__ = ["PHASES", "Config", "ConfigError", "Problem", "parse_config",
           "to_datetime"]


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
    max_held_bytes: int = 16 * 2**20  # what mirrors keep to compare (shadow.py rule 8)
    max_loop_share: float = 0.25  # of the event loop's time, for reading mirrors' answers


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


def parse_config(data: bytes | str, *, base: Path | None = None,
                 source: Path | None = None) -> Config:
    raw = data.encode() if isinstance(data, str) else data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", "not UTF-8 text")]) from exc
    problems: list[Problem] = []
    values = read_fields(Section(load_yaml(text), "", problems), TOP)
    if problems:
        raise ConfigError(problems)
    config = Config(**values, source=source, version=hashlib.sha256(raw).hexdigest()[:12])
    return rooted(config, base or Path.cwd())


def rooted(config: Config, base: Path) -> Config:
    """The file's relative paths, made relative to its directory rather than the cwd."""
    telemetry, capture = config.telemetry, config.telemetry.capture
    if capture is not None:
        capture = replace(capture, file=base / capture.file)
    trace_file = base / telemetry.trace_file if telemetry.trace_file else None
    return replace(config, telemetry=replace(telemetry, trace_file=trace_file, capture=capture),
                   state=replace(config.state, path=base / config.state.path))


# Readers of the keys with structure, each given its section and its row. ---------------------


def address(s: Section, f: Field) -> Address:
    value = s.text(f.key, f.default) or f.default
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        s.report(f.key, f"must be HOST:PORT, got {value!r}")
        host, _, port = f.default.rpartition(":")
    return Address(host.strip("[]") or "0.0.0.0", int(port))


def json_paths(s: Section, f: Field) -> tuple[str, ...]:
    return tuple(strings(s, f, "JSON paths"))


def redacted(s: Section, f: Field) -> frozenset[str]:
    return frozenset(name.lower() for name in strings(s, f, "JSON field names"))


def http_methods(s: Section, f: Field) -> frozenset[str]:
    methods = s.raw(f.key, f.default)
    if not isinstance(methods, list) or not all(isinstance(m, str) and m for m in methods):
        s.report(f.key, f"must be a list of HTTP methods, got {methods!r}")
        methods = f.default
    return frozenset(m.upper() for m in methods)


def backend_url(s: Section, f: Field) -> str:
    url = s.text(f.key, None)
    if url is None:
        s.report(f.key, "is required, e.g. http://127.0.0.1:8001")
    elif urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        s.report(f.key, f"must be an http:// or https:// URL, got {url!r}")
    return (url or "http://127.0.0.1").rstrip("/")


def salt(s: Section, f: Field) -> str:
    return str(s.raw(f.key, f.default))  # a number is a salt too


def read_schedule(s: Section, f: Field) -> tuple[ScheduleStep, ...]:
    steps = s.raw(f.key, f.default) or []
    if not isinstance(steps, list):
        s.report(f.key, "must be a list of {at, phase?, percentage?}")
        return ()
    result = []
    for index, raw in enumerate(steps):
        step = Section(raw, f"{s.key_path(f.key)}[{index}]", s.problems, s.line_of(f.key))
        values = read_fields(step, f.fields)
        if not step.has("phase") and values["percentage"] is None:
            step.report("", "a step needs a phase, a percentage or both")
        if values["at"] is not None:
            result.append(ScheduleStep(**values))
    return tuple(sorted(result, key=lambda step: step.at))


def read_user_id(s: Section, f: Field) -> tuple[UserIdSource, ...]:
    raw = s.raw(f.key, f.default)
    sources = []
    for index, item in enumerate(raw if isinstance(raw, list) else [raw]):
        path, line = f"{s.key_path(f.key)}[{index}]", s.line_of(f.key)
        if not (isinstance(item, dict) and len(item) == 1):
            s.problems.append(Problem(path, "must be one of {header: NAME}, {cookie: NAME}, "
                                      f"{{query: NAME}}, {{json: FIELD}}, got {item!r}", line))
            continue
        ((kind, name),) = item.items()
        if kind not in USER_ID_KINDS or not isinstance(name, str) or not name:
            s.problems.append(Problem(path, f"unknown source {kind!r}"
                                      f"{suggest(kind, USER_ID_KINDS)}", line))
            continue
        sources.append(UserIdSource(str(kind), name))
    return tuple(sources)


def read_session(s: Section, f: Field) -> UserIdSource | None:
    raw = s.raw(f.key)
    if raw is None:
        return None
    kind, name = next(iter(raw.items())) if isinstance(raw, dict) and len(raw) == 1 else ("", "")
    if kind not in ("header", "cookie") or not isinstance(name, str) or not name:
        s.report(f.key, f"must be {{header: NAME}} or {{cookie: NAME}}, got {raw!r}")
        return None
    return UserIdSource(str(kind), name)


def fallback_on(s: Section, f: Field) -> tuple[frozenset[str], frozenset[int]]:
    raw = s.raw(f.key, f.default)
    if not isinstance(raw, list):
        s.report(f.key, f"must be a list such as [connect_error, timeout, 5xx, 429], got {raw!r}")
        return frozenset(FALLBACK_KINDS), frozenset()
    kinds, statuses = set(), set()
    for item in raw:
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            statuses.add(item)
        elif item in FALLBACK_KINDS:
            kinds.add(str(item))
        else:
            s.report(f.key, f"unknown failure kind {item!r}{suggest(item, FALLBACK_KINDS)}; "
                     "use connect_error, timeout, 5xx or a status code")
    return frozenset(kinds), frozenset(statuses)


def capture_file(s: Section, f: Field) -> Path:
    file = s.text(f.key, None)
    if not file:
        s.report(f.key, "is required, e.g. captures/patterns.jsonl")
    return Path(file or ".")


def extract(s: Section, f: Field) -> Extract:
    values = read_section(s, f)
    json_path = values["json"]
    return Extract(values["header"], tuple(json_path.split(".")) if json_path else None)


# Sections whose keys do not map one to one onto their dataclass, or that check across keys. --


def read_backend(s: Section, f: Field) -> BackendConfig | None:
    if not s.has(f.key):
        s.report("", f"missing backend {f.key!r}")
        return None
    return BackendConfig(name=f.key, **read_section(s, f))


def read_backends(s: Section, f: Field) -> dict[str, BackendConfig]:
    return {name: backend for name, backend in read_section(s, f).items() if backend is not None}


def read_rollout(s: Section, f: Field) -> RolloutConfig:
    section = s.section(f.key)
    rollout = RolloutConfig(**read_fields(section, f.fields))
    if rollout.sunset_date and rollout.deprecation_date and (
            rollout.sunset_date < rollout.deprecation_date):
        section.report("sunset_date", "must not be before rollout.deprecation_date (RFC 8594)")
    return rollout


def read_shadow(s: Section, f: Field) -> ShadowConfig:
    values = read_section(s, f)
    budget, compare = values.pop("budget"), values.pop("compare")
    return ShadowConfig(**values, **budget, **compare)  # their keys are ShadowConfig's own


def read_fallback(s: Section, f: Field) -> FallbackConfig:
    values = read_section(s, f)
    on, statuses = values.pop("on")
    return FallbackConfig(**values, on=on, statuses=statuses)


def read_telemetry(s: Section, f: Field) -> TelemetryConfig:
    values = read_section(s, f)
    prices, days = values.pop("cost"), values.pop("active_users")
    return TelemetryConfig(**values, active_users_days=days, usd_per_1k_tokens={
        name: price for name, price in prices.items() if price is not None})


def read_capture(s: Section, f: Field) -> CaptureConfig | None:
    return None if s.raw(f.key) is None else CaptureConfig(**read_section(s, f))


def read_state(s: Section, f: Field) -> StateConfig:
    section = s.section(f.key)
    state = StateConfig(**read_fields(section, f.fields))
    if state.backend == "redis" and not state.redis_url:
        section.report("redis_url", "is required with state.backend: redis, "
                       "e.g. redis://127.0.0.1:6379/0")
    elif state.redis_url and urlsplit(state.redis_url).scheme not in ("redis", "rediss", "unix"):
        section.report("redis_url", f"must be a redis:// URL, got {state.redis_url!r}")
    return state


# The tables: every key the file may hold, its type, its default as written, bounds, purpose. -

BACKEND = (
    Field("url", str, REQUIRED, "http:// or https:// base URL", read=backend_url),
    Field("timeout_s", float, 60, "first byte, and the longest silence mid-answer", low=0,
          low_open=True),
    Field("connect_timeout_s", float, 5, "TCP connect", low=0, low_open=True),
    Field("max_connections", int, 10_000, "bound of its connection pool", low=1),
    Field("headers", tuple[tuple[str, str], ...], {}, "sent on every request to it",
          read=header_map),
)
STEP = (
    Field("at", datetime, REQUIRED, "when due: a date or RFC 3339 time", read=due),
    Field("phase", str | None, None, "the phase from then on", choices=PHASES),
    Field("percentage", float | None, None, "the percentage from then on", low=0, high=100),
)
ROLLOUT = (
    Field("phase", str, "legacy", "who next_gen serves", choices=PHASES),
    Field("percentage", float, 0, "share of users on next_gen", low=0, high=100),
    Field("salt", str, "rollout", "changing it reshuffles every user", read=salt),
    Field("sunset_date", datetime | None, None, "Sunset header in `default`", read=moment),
    Field("deprecation_date", datetime | None, None, "Deprecation header", read=moment),
    Field("migration_url", str | None, None, "Link rel=deprecation; named in sunset's 410"),
    Field("schedule", tuple[ScheduleStep, ...], [], "steps applied when due and guards pass",
          fields=STEP, read=read_schedule),
    Field("rollback_over_s", float, 0, "a manual rollback steps down over this long", low=0),
)
ROUTING = (
    Field("user_id", tuple[UserIdSource, ...], [{"header": "X-User-Id"}],
          "where the user id is looked for, first found wins", read=read_user_id),
    Field("opt_header", str, "X-Next-Gen", "1|true|yes opts in, 0|false|no opts out"),
    Field("anonymous", str, "legacy", "where requests without a user id go",
          choices=("legacy", "random")),
    Field("paths", tuple[str, ...], ["/"], "prefixes under the rollout", read=path_prefixes),
    Field("bucketing", str, "murmur3", "how a bucket is computed",
          choices=("murmur3", "unleash")),
    Field("session", UserIdSource | None, None, "{header|cookie: NAME} pinned to a backend",
          read=read_session),
    Field("session_ttl_s", float, 3600, "a pin's life after its last request", low=0,
          low_open=True),
    Field("session_max", int, 100_000, "pins kept, least recently used out first", low=1),
)
COMPARE = (
    Field("ignore", tuple[str, ...], [], "JSON paths left out", read=json_paths),
    Field("baseline_sample", float, 0.0, "share also sent again to legacy, to learn noise",
          low=0, high=1),
)
BUDGET = (
    Field("tokens_per_hour", float | None, None, "mirrors dropped past this", low=0),
    Field("usd_per_hour", float | None, None, "mirrors dropped past this", low=0),
)
SHADOW = (
    Field("sample", float, 1.0, "fraction of eligible requests mirrored", low=0, high=1),
    Field("max_in_flight", int, 256, "beyond this a mirror is dropped, never queued", low=0),
    Field("timeout_s", float, 60, "first byte, and the longest silence mid-answer", low=0,
          low_open=True),
    Field("compare", dict, {}, "how two answers are compared", fields=COMPARE),
    Field("methods", frozenset[str], ["GET", "HEAD", "POST"], "the methods mirrored",
          read=http_methods),
    Field("exclude_paths", tuple[str, ...], [], "prefixes never mirrored", read=path_prefixes),
    Field("headers", tuple[tuple[str, str], ...], {}, "added to every copy", read=header_map),
    Field("budget", dict, {}, "spend caps on mirroring", fields=BUDGET),
    Field("max_held_bytes", int, 16 * 2**20, "what mirrors keep to compare, in all", low=0),
    Field("max_loop_share", float, 0.25, "of the event loop's time, for reading mirrors' "
          "answers; past it mirrors are dropped (1: no bound)", low=0, high=1, low_open=True),
)
CIRCUIT = (
    Field("consecutive_failures", int, 5, "open after this many failures in a row", low=1),
    Field("error_rate", float, 0.5, "or this error rate over window_s", low=0, high=1,
          low_open=True),
    Field("window_s", float, 10, "the error rate's window", low=0, low_open=True),
    Field("min_requests", int, 20, "requests in the window before the rate counts", low=1),
    Field("cooldown_s", float, 30, "skip next_gen this long once open", low=0, low_open=True),
    Field("probes", int, 3, "requests probing next_gen before it closes", low=1),
)
FALLBACK = (
    Field("enabled", bool, True, "retry on legacy when next_gen fails"),
    Field("on", tuple[frozenset[str], frozenset[int]], list(FALLBACK_KINDS),
          "failure kinds, and status codes", read=fallback_on),
    Field("attempts", int, 1, "tries on legacy after next_gen failed", low=1, high=10),
    Field("budget_ratio", float, 0.2, "fallbacks at most this share of requests", low=0,
          high=1),
    Field("budget_window_s", float, 10, "the budget's window", low=0, low_open=True),
    Field("circuit", CircuitConfig, {}, "the breaker on next_gen", fields=CIRCUIT),
)
LIMITS = (
    Field("max_body_bytes", int, 10_485_760, "larger request bodies get 413", low=0),
    Field("header_timeout_s", float, 10, "request head not in by then: 408", low=0,
          low_open=True),
    Field("max_in_flight", int, 10_000, "client requests at once; beyond, 503", low=1),
    Field("trusted_hops", int, 0, "X-Forwarded-* kept behind this many proxies", low=0),
    Field("drain_timeout_s", float, 30, "in-flight requests' time on SIGTERM", low=0),
    Field("max_header_bytes", int, 65536, "a backend's answer head past this: 502", low=1024),
)
EXTRACT = (
    Field("header", str | None, None, "the response header holding the figure"),
    Field("json", str | None, None, "else a dotted path into the JSON body"),
)
PRICE = (Field("usd_per_1k_tokens", float, 0.0, "USD per 1,000 tokens", low=0),)
CAPTURE = (
    Field("file", Path, REQUIRED, "where the samples are kept", read=capture_file),
    Field("per_pattern", int, 3, "samples kept per usage pattern", low=0),
    Field("max_body_bytes", int, 65536, "a larger body is kept truncated", low=0),
    Field("redact", frozenset[str], ["password", "token", "api_key", "secret"],
          "JSON fields blanked", read=redacted),
    # 1,000 patterns x 3 samples x 64 KiB bounds capture near 200 MB at worst.
    Field("max_patterns", int, 1_000, "patterns kept", low=1),
)
TELEMETRY = (
    Field("tokens", Extract, {"header": "X-Tokens-Used", "json": "usage.total_tokens"},
          "tokens an answer used", fields=EXTRACT, read=extract),
    Field("success", Extract, {"json": "success"}, "else: status < 500", fields=EXTRACT,
          read=extract),
    Field("memory", Extract, {"header": "X-Memory-MB"}, "memory an answer took",
          fields=EXTRACT, read=extract),
    Field("trace_file", Path | None, "traces/comparisons.jsonl", "the comparisons; null: off"),
    Field("trace_max_bytes", int, 100 * 2**20, "rotate the trace past this", low=1024),
    Field("trace_keep", int, 5, "rotated trace files kept", low=0),
    Field("json_max_bytes", int, 2**20, "larger answers are not parsed for figures", low=0),
    Field("cost", dict, {}, "prices per backend; unset: no cost figured", fields=tuple(
        Field(name, float | None, None, f"{name}'s price", fields=PRICE, read=only_value)
        for name in BACKENDS)),
    Field("active_users", int, {}, "distinct users per backend per UTC day", fields=(
        Field("days", int, 90, "days kept", low=1, high=3660),), read=only_value),
    Field("capture", CaptureConfig | None, None, "usage-pattern samples, for replay",
          fields=CAPTURE, read=read_capture),
)
GUARDS = (
    Field("window_s", float, 300, "the window each guard judges", low=0, low_open=True),
    Field("min_requests", int, 50, "next_gen answers before a guard judges", low=1),
    Field("error_rate", float | None, 0.05, "next_gen error rate above this", low=0, high=1),
    Field("latency_degradation", float | None, 0.20, "p50 this much above legacy's", low=0),
    Field("memory_spike", float | None, 2.0, "memory this many times legacy's", low=0),
    Field("max_tokens", float | None, 20000, "mean tokens per request above this", low=0),
    Field("max_time_ms", float | None, None, "p95 time above this", low=0),
    Field("complaints_per_hour", float | None, 10, "complaints an hour above this", low=0),
    Field("action", str, "rollback", "what a trip does", choices=("rollback", "alert")),
    Field("webhook", str | None, None, "receives a JSON POST on every trip", read=http_url),
)
STATE = (
    Field("backend", str, "file", "redis: replicas share state", choices=("file", "redis")),
    Field("path", Path, "state/rollout-state.json", "the state file"),
    Field("redis_url", str | None, None, "redis://HOST:PORT/DB"),
)
ADMIN = (
    Field("listen", Address, "127.0.0.1:9090", "/metrics, /healthz, /readyz, /admin/*",
          read=address),
    Field("token_env", str, "ROLLOUT_ADMIN_TOKEN", "env var with the bearer token"),
)
TOP = (
    Field("listen", Address, "0.0.0.0:8080", "client traffic", read=address),
    Field("admin", AdminConfig, {}, "the admin listener", fields=ADMIN),
    Field("backends", dict[str, BackendConfig], REQUIRED, "legacy and next_gen", fields=tuple(
        Field(name, BackendConfig, REQUIRED, f"the {name} service", fields=BACKEND,
              read=read_backend) for name in BACKENDS), read=read_backends),
    Field("rollout", RolloutConfig, {}, "who goes where", fields=ROLLOUT, read=read_rollout),
    Field("routing", RoutingConfig, {}, "how a user is found", fields=ROUTING),
    Field("shadow", ShadowConfig, {}, "mirroring", fields=SHADOW, read=read_shadow),
    Field("fallback", FallbackConfig, {}, "retry on legacy", fields=FALLBACK,
          read=read_fallback),
    Field("limits", LimitsConfig, {}, "bounds on client traffic", fields=LIMITS),
    Field("telemetry", TelemetryConfig, {}, "what answers measured", fields=TELEMETRY,
          read=read_telemetry),
    Field("guards", GuardsConfig, {}, "when next_gen is rolled back", fields=GUARDS),
    Field("state", StateConfig, {}, "rollout state", fields=STATE, read=read_state),
)
