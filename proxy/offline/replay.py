"""`rollout-proxy replay`: send every captured usage pattern to next_gen before users meet it.

Rules:
1. A pattern that the shadow rules (`shadow.methods`, `shadow.exclude_paths`) would not mirror
   is not replayed: it is listed as skipped with the reason (a sample whose concrete path is
   under an excluded prefix is not sent either). Without --config the loader's
   defaults apply (GET, HEAD and POST; nothing excluded).
2. Every request carries `X-Rollout-Replay: 1`, the backend's configured `headers` and
   `shadow.headers`. A sample whose body was not kept at capture (too large, binary) is not
   sent: sending it without its body would test another request.
3. With --baseline, the two answers of a sample are compared by the shadow comparison rules
   (status class, success, JSON shape minus `shadow.compare.ignore`; never values: agents
   are not deterministic). Without one, a sample passes on a complete, non-5xx answer.
4. A pattern is incompatible when one of its samples is, an error when one got no usable
   answer, compatible when all of its sent samples passed, skipped when none was sent.
5. Exit 0 when every replayed pattern is compatible, 1 when one is not, 2 on unreadable input
   (a missing file, no pattern, a bad line, named with its number, or a bad --config): the
   whole file is read and checked before anything is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config.loading import load_config
from proxy.config.model import Config, ConfigError, parse_config
from proxy.datapath.capture import NOT_JSON, REPLAY_HEADER
from proxy.datapath.decide import mirrorable
from proxy.telemetry.compare import compare
from proxy.telemetry.observe import Measurement, measure_tee, no_answer, tee_for

# The loader's defaults: what the shadow rules are when no --config is given.
DEFAULTS = "backends: {legacy: {url: 'http://127.0.0.1'}, next_gen: {url: 'http://127.0.0.1'}}"


class BadInput(Exception):
    """The patterns file cannot be read; the message names the line."""


@dataclass(frozen=True, slots=True)
class Sample:
    path: str | None  # the concrete path and query captured (None in files without one)
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    unsent: str | None  # why this sample is not sent


@dataclass(frozen=True, slots=True)
class Pattern:
    line: int
    method: str
    path: str
    shape: str
    count: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class Outcome:
    pattern: Pattern
    result: str  # compatible | incompatible | skipped | error
    detail: str = ""
    sent: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    seen: Measurement
    document: Any


# -- reading -------------------------------------------------------------------------------

def read_patterns(path: Path) -> list[Pattern]:
    patterns = []
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                if raw.strip():
                    patterns.append(pattern_at(path, number, raw))
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc.strerror}") from exc
    if not patterns:
        raise BadInput(f"{path}: holds no pattern")
    return patterns


def pattern_at(path: Path, number: int, raw: bytes) -> Pattern:
    try:
        return read_pattern(raw, number)
    except BadInput as exc:
        raise BadInput(f"{path}:{number}: {exc}") from None


def read_pattern(raw: bytes, number: int) -> Pattern:
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"not JSON ({exc})") from None
    if not isinstance(line, dict):
        raise BadInput("not a JSON object")
    method, path, shape, count = (line.get(k) for k in ("method", "path", "shape", "count"))
    if not isinstance(method, str) or not method.isalpha():
        raise BadInput(f"method must be an HTTP method, got {method!r}")
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadInput(f"path must start with '/', got {path!r}")
    if not isinstance(shape, str):
        raise BadInput(f"shape must be a string, got {shape!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise BadInput(f"count must be a whole number >= 0, got {count!r}")
    samples = line.get("samples")
    if not isinstance(samples, list):
        raise BadInput(f"samples must be a list, got {samples!r}")
    return Pattern(number, method.upper(), path, shape, count,
                   tuple(read_sample(s, index, shape) for index, s in enumerate(samples)))


def read_sample(sample: Any, index: int, shape: str) -> Sample:
    where = f"samples[{index}]"
    if not isinstance(sample, dict):
        raise BadInput(f"{where} must be an object")
    headers = sample.get("headers", {})
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise BadInput(f"{where}.headers must map names to strings")
    path = sample.get("path")
    if path is not None and (not isinstance(path, str) or not path.startswith("/")):
        raise BadInput(f"{where}.path must start with '/', got {path!r}")
    pairs = tuple(headers.items())
    if shape != NOT_JSON and not any(k.lower() == "content-type" for k in headers):
        pairs += (("Content-Type", "application/json"),)
    if sample.get("truncated"):
        return Sample(path, pairs, None, "body over max_body_bytes at capture")
    if sample.get("omitted"):
        return Sample(path, pairs, None, f"body not kept at capture ({sample['omitted']})")
    body = sample.get("body")
    if body is None:
        return Sample(path, pairs, None, None)
    if shape == NOT_JSON:
        if not isinstance(body, str):
            raise BadInput(f"{where}.body must be text for a non-JSON shape")
        return Sample(path, pairs, body.encode(), None)
    return Sample(path, pairs, json.dumps(body, separators=(",", ":")).encode(), None)


def shadow_config(path: Path | None) -> Config:
    return load_config(path) if path is not None else parse_config(DEFAULTS)


# -- replaying -----------------------------------------------------------------------------

class Replayer:
    def __init__(self, config: Config, http: aiohttp.ClientSession, target: str,
                 baseline: str | None, concurrency: int, timeout_s: float) -> None:
        self.config, self.http = config, http
        self.target, self.baseline = target.rstrip("/"), baseline and baseline.rstrip("/")
        self.slots = asyncio.Semaphore(concurrency)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.ignore = frozenset(config.shadow.ignore)

    async def pattern(self, pattern: Pattern) -> Outcome:
        refusal = mirrorable(pattern.method, pattern.path, self.config.shadow)
        if refusal is not None:
            return Outcome(pattern, "skipped", refusal)
        notes: list[str] = []
        verdicts: list[tuple[str, str]] = []
        for sample in pattern.samples:
            path = sample.path or pattern.path
            unsent = sample.unsent or ("no concrete path captured" if "{id}" in path else None)
            # A concrete path may fall under an excluded prefix that its template does not.
            unsent = unsent or mirrorable(pattern.method, path.split("?", 1)[0],
                                          self.config.shadow)
            if unsent is not None:
                notes.append(f"a sample not sent: {unsent}")
                continue
            verdicts.append(await self.sample(pattern.method, path, sample))
        return judge(pattern, verdicts, notes)

    async def sample(self, method: str, path: str, sample: Sample) -> tuple[str, str]:
        sends = [self.send("next_gen", self.target, method, path, sample)]
        if self.baseline:
            sends.append(self.send("legacy", self.baseline, method, path, sample))
        answers = await asyncio.gather(*sends)
        new = answers[0]
        if new.seen.status is None:
            return "error", f"target: {new.seen.error or 'no answer'}"
        if not self.baseline:
            if new.seen.status >= 500:
                return "incompatible", f"target answered {new.seen.status}"
            return "compatible", ""
        old = answers[1]
        if old.seen.status is None:
            return "error", f"baseline: {old.seen.error or 'no answer'}"
        result = compare(old.seen, old.document, new.seen, new.document, self.ignore)
        if result.result == "match":
            return "compatible", ""
        return "incompatible", differences(result.status, result.success, result.diff,
                                           old.seen, new.seen)

    def headers(self, backend: str, sample: Sample) -> CIMultiDict[str]:
        headers = CIMultiDict(sample.headers)
        # aiohttp asks for what it can decode: an answer in an encoding it cannot read would
        # have no JSON document on either side, and so never differ in shape.
        headers.popall("Accept-Encoding", None)
        for name, value in (*self.config.backends[backend].headers, *self.config.shadow.headers,
                            (REPLAY_HEADER, "1")):
            headers[name] = value
        return headers

    async def send(self, backend: str, base: str, method: str, path: str,
                   sample: Sample) -> Answer:
        telemetry = self.config.telemetry
        async with self.slots:
            started = time.monotonic()
            try:
                async with self.http.request(
                        method, URL(base + path, encoded=True), data=sample.body,
                        headers=self.headers(backend, sample), timeout=self.timeout,
                        allow_redirects=False) as response:
                    # aiohttp decompressed the body: measure it as the plain bytes it now is.
                    headers = CIMultiDict(response.headers)
                    headers.popall("Content-Encoding", None)
                    tee = tee_for(headers, telemetry, True)
                    first_byte = None
                    async for chunk in response.content.iter_any():
                        first_byte = first_byte or time.monotonic()
                        tee.feed(chunk)
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return Answer(no_answer(failure(exc), (time.monotonic() - started) * 1000),
                              None)
        return Answer(*measure_tee(status, headers, tee, started=started, first_byte=first_byte,
                                   ended=time.monotonic(), telemetry=telemetry,
                                   backend=backend))


def failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated"
    if isinstance(exc, ValueError):
        return f"bad_request ({exc})"
    return f"reset ({type(exc).__name__})"


def differences(same_status: bool, same_success: bool, diff: tuple[str, ...],
                old: Measurement, new: Measurement) -> str:
    parts = []
    if not same_status:
        parts.append(f"status {old.status} vs {new.status}")
    if not same_success:
        parts.append(f"success {old.success} vs {new.success}")
    if diff:
        parts.append("shape differs at " + ", ".join(diff))
    return "; ".join(parts)


def judge(pattern: Pattern, verdicts: list[tuple[str, str]], notes: list[str]) -> Outcome:
    if not verdicts:
        why = "; ".join(dict.fromkeys(notes)) or "no sample captured"
        return Outcome(pattern, "skipped", why)
    for result in ("incompatible", "error"):
        details = [detail for verdict, detail in verdicts if verdict == result]
        if details:
            return Outcome(pattern, result, "; ".join(dict.fromkeys(details + notes)),
                           len(verdicts))
    return Outcome(pattern, "compatible", "; ".join(dict.fromkeys(notes)), len(verdicts))


async def replay_all(patterns: list[Pattern], config: Config, args: argparse.Namespace,
                     progress: Progress) -> list[Outcome]:
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        replayer = Replayer(config, http, args.target, args.baseline, args.concurrency,
                            args.timeout or config.shadow.timeout_s)

        async def one(pattern: Pattern) -> Outcome:
            outcome = await replayer.pattern(pattern)
            progress.advance()
            return outcome

        return list(await asyncio.gather(*(one(p) for p in patterns)))


class Progress:
    """A bar on stderr, redrawn in place; nothing when stderr is not a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.shown = stream.isatty()

    def advance(self) -> None:
        self.done += 1
        if self.shown:
            filled = 30 * self.done // self.total
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] "
                              f"{self.done}/{self.total} patterns")
            self.stream.flush()

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")


# -- reporting -----------------------------------------------------------------------------

def labels(outcomes: list[Outcome]) -> list[str]:
    """`METHOD path`, with the shape when another pattern has the same method and path."""
    names = Counter(o.pattern.name for o in outcomes)
    return [o.pattern.name + (f" {o.pattern.shape[:40]}" if names[o.pattern.name] > 1 else "")
            for o in outcomes]


def result_text(outcome: Outcome) -> str:
    return f"{outcome.result}: {outcome.detail}" if outcome.detail else outcome.result


def format_rows(outcomes: list[Outcome]) -> str:
    rows = [("pattern", "samples", "seen", "result")]
    rows += [(name, f"{o.sent}/{len(o.pattern.samples)}", str(o.pattern.count), result_text(o))
             for name, o in zip(labels(outcomes), outcomes, strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    tally = {name: sum(o.result == name for o in outcomes)
             for name in ("compatible", "incompatible", "error", "skipped")}
    plural = "" if len(outcomes) == 1 else "s"
    counts = ", ".join(f"{n} {name}" for name, n in tally.items())
    lines.append(f"{len(outcomes)} pattern{plural}: {counts}")
    return "\n".join(lines)


def junit(outcomes: list[Outcome], seconds: float) -> ET.ElementTree[ET.Element]:
    suite = ET.Element("testsuite", {
        "name": "rollout-proxy replay", "tests": str(len(outcomes)),
        "failures": str(sum(o.result in ("incompatible", "error") for o in outcomes)),
        "errors": "0", "skipped": str(sum(o.result == "skipped" for o in outcomes)),
        "time": f"{seconds:.3f}"})
    for name, outcome in zip(labels(outcomes), outcomes, strict=True):
        case = ET.SubElement(suite, "testcase", {"classname": "replay", "name": name})
        if outcome.result in ("incompatible", "error"):
            failed = ET.SubElement(case, "failure", {"type": outcome.result,
                                                     "message": result_text(outcome)})
            failed.text = (f"pattern line {outcome.pattern.line}, shape {outcome.pattern.shape}, "
                           f"seen {outcome.pattern.count} times: {outcome.detail}")
        elif outcome.result == "skipped":
            ET.SubElement(case, "skipped", {"message": outcome.detail})
    return ET.ElementTree(suite)


# -- the command ---------------------------------------------------------------------------

def http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, got {value!r}")
    return value


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patterns", type=Path, metavar="PATTERNS.jsonl",
                        help="a usage-pattern capture (telemetry.capture.file)")
    parser.add_argument("--target", required=True, type=http_url, metavar="URL",
                        help="the system under test (next_gen)")
    parser.add_argument("--baseline", type=http_url, metavar="URL",
                        help="the reference (legacy): answers are compared by shape")
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help="apply its shadow rules (methods, exclude_paths, headers, "
                        "compare.ignore), telemetry and backend headers; default: the loader's")
    parser.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML here")
    parser.add_argument("--concurrency", type=positive, default=8, metavar="N",
                        help="requests in flight at once (default 8)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="per request (default: shadow.timeout_s, 60)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "replay", help="send every captured usage pattern to a target, compare with a baseline",
        description=__doc__.split("\n\n", 1)[0] + " Exit 0 when every replayed pattern is "
        "compatible, 1 when one is not, 2 on unreadable input.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        patterns = read_patterns(args.patterns)
        config = shadow_config(args.config)
    except BadInput as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"replay: {args.config}: the config is refused:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    progress = Progress(len(patterns), sys.stderr)
    outcomes = asyncio.run(replay_all(patterns, config, args, progress))
    progress.finish()
    print(format_rows(outcomes))
    if args.junit is not None:
        tree = junit(outcomes, time.monotonic() - started)
        ET.indent(tree)
        try:
            tree.write(args.junit, encoding="utf-8", xml_declaration=True)
        except OSError as exc:
            print(f"replay: cannot write {args.junit}: {exc.strerror}", file=sys.stderr)
            return 2
    if all(o.result == "skipped" for o in outcomes):
        print("replay: every pattern was skipped: nothing was replayed", file=sys.stderr)
    return 0 if all(o.result in ("compatible", "skipped") for o in outcomes) else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rollout-proxy replay", description=__doc__)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return run(args)
