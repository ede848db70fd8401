"""`rollout-proxy report` and `compare`: read comparison traces, print figures and targets.

This module finds and reads the trace files (and, with --admin-url or --status, a proxy's
/admin/status) and wires the two subcommands; the figures are computed in report_stats
(pure, streaming) and report_status, and rendered by report_format and report_html.
Exit codes: 0 every target passes (a target with no data neither passes nor fails),
1 a target fails, 2 the trace is missing, empty or unreadable, or the status cannot be read.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import http.client
import io
import json
import re
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Final

from proxy.offline.report_format import compare_json, format_compare, format_report, summary_json
from proxy.offline.report_html import render_html
from proxy.offline.report_stats import Summary, summarise
from proxy.offline.report_status import StatusFigures, failed, read_status
from proxy.offline.report_trace import MAX_LINE_BYTES, Line

__all__ = ["StatusError", "TraceError", "fetch_status", "main", "read_trace", "register",
           "summarise", "trace_files"]

PROGRESS_MIN_BYTES: Final = 16 << 20  # smaller traces are read before a bar would be seen
PROGRESS_EVERY_LINES: Final = 8192
STATUS_TIMEOUT_S: Final = 10.0
MAX_STATUS_BYTES: Final = 16 << 20  # a status document is a few kB; more is not one

Progress = Callable[[int, int], None]  # (bytes read, lines read)


class TraceError(Exception):
    """The trace cannot be summarised at all (exit 2)."""


class StatusError(Exception):
    """The /admin/status asked for cannot be fetched or read (exit 2)."""


# --- reading ---------------------------------------------------------------------------


def trace_files(path: Path) -> list[Path]:
    """The trace and its rotated siblings, oldest first: X.2.gz, X.1, X."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)(\.gz)?")
    rotated: dict[int, Path] = {}
    for sibling in path.parent.glob(glob.escape(path.name) + ".*"):
        found = pattern.fullmatch(sibling.name)
        if found is None:
            continue
        number = int(found[1])
        # X.1 and X.1.gz at once means the writer is still compressing: the plain one is whole.
        if number not in rotated or not found[2]:
            rotated[number] = sibling
    files = [rotated[n] for n in sorted(rotated, reverse=True)]
    return [*files, path] if path.is_file() else files


def _lines(stream: io.BufferedIOBase) -> Iterator[bytes]:
    # readline's limit keeps one newline-less giant from being read into memory whole.
    while data := stream.readline(MAX_LINE_BYTES):
        yield data
        if len(data) == MAX_LINE_BYTES and not data.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass


def _decoded(raw: io.BufferedReader) -> io.BufferedIOBase:
    """The file's lines, gunzipped when it starts with gzip's magic, whatever its name."""
    return gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw


def read_lines(files: Sequence[Path], problems: list[str],
               progress: Progress | None = None) -> Iterator[Line]:
    """Every line of every file in order; a file that cannot be read is noted in problems."""
    done = count = 0
    for file in files:
        number = 0
        try:
            with file.open("rb") as raw, _decoded(raw) as stream:
                for number, data in enumerate(_lines(stream), 1):
                    yield file.name, number, data
                    count += 1
                    if progress is not None and count % PROGRESS_EVERY_LINES == 0:
                        progress(done + raw.tell(), count)
        except (OSError, EOFError, zlib.error) as exc:
            problems.append(f"{file}: unreadable after line {number}: {exc}")
        done += _size(file)


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:  # rotated away since it was listed: counted as empty
        return 0


def read_trace(path: Path, progress: Progress | None = None) -> Summary:
    if path.is_dir():
        raise TraceError(f"{path}: is a directory, not a trace file")
    files = trace_files(path)
    if not files:
        raise TraceError(f"{path}: no such trace file")
    problems: list[str] = []
    summary = summarise(read_lines(files, problems, progress))
    summary = replace(summary, sources=tuple(str(f) for f in files),
                      read_problems=tuple(problems))
    if summary.overall.comparisons == 0:
        raise TraceError(_why_empty(path, summary))
    return summary


def _why_empty(path: Path, summary: Summary) -> str:
    if summary.first_bad is not None:
        return f"{path}: no readable comparison; first bad line {summary.first_bad}"
    if summary.read_problems:
        return summary.read_problems[0]
    return f"{path}: trace is empty"


def format_progress(done: int, total: int, lines: int, width: int = 30) -> str:
    share = min(1.0, done / total) if total else 1.0
    filled = round(share * width)
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {share:4.0%}  {lines:,} lines"


class ProgressBar:
    """One line on stderr, redrawn at most five times a second."""

    def __init__(self, total: int, stream: IO[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._total, self._stream, self._clock = total, stream, clock
        self._drawn = -1.0

    def __call__(self, done: int, lines: int) -> None:
        now = self._clock()
        if now - self._drawn >= 0.2:
            self._drawn = now
            self._stream.write(format_progress(done, self._total, lines))
            self._stream.flush()

    def close(self) -> None:
        if self._drawn >= 0:
            self._stream.write("\r" + " " * 60 + "\r")
            self._stream.flush()


# --- the proxy's status ----------------------------------------------------------------


def status_url(admin_url: str) -> str:
    base = admin_url.strip().rstrip("/")
    if "://" not in base:
        base = "http://" + base  # "127.0.0.1:9090", as admin.listen spells it
    return base + "/admin/status"


def _parsed(data: bytes, source: str) -> Any:
    if len(data) > MAX_STATUS_BYTES:
        raise StatusError(f"{source}: larger than {MAX_STATUS_BYTES:,} bytes: not a status")
    try:
        document = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise StatusError(f"{source}: not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise StatusError(f"{source}: not a JSON object, so not an /admin/status document")
    return document


def fetch_status(admin_url: str, timeout: float = STATUS_TIMEOUT_S) -> StatusFigures:
    url = status_url(admin_url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read(MAX_STATUS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise StatusError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot fetch {url}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise StatusError(f"cannot fetch {url}: {str(exc) or type(exc).__name__}") from exc
    return read_status(_parsed(data, url), url)


def load_status_file(path: Path) -> StatusFigures:
    source = "<stdin>" if str(path) == "-" else str(path)
    try:
        data = sys.stdin.buffer.read() if source == "<stdin>" else path.read_bytes()
    except OSError as exc:
        raise StatusError(f"{source}: cannot read the status file: {exc.strerror or exc}") \
            from exc
    return read_status(_parsed(data, source), source)


def _status(args: argparse.Namespace) -> StatusFigures | None:
    if args.admin_url is not None:
        return fetch_status(args.admin_url)
    if args.status is not None:
        return load_status_file(args.status)
    return None


# --- command line ----------------------------------------------------------------------


def _load(path: Path) -> Summary:
    total = sum(map(_size, trace_files(path)))
    if not (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES):
        return read_trace(path)
    bar = ProgressBar(total, sys.stderr)
    try:
        return read_trace(path, bar)
    finally:
        bar.close()


def run_report(args: argparse.Namespace) -> int:
    try:
        # The status first: a wrong URL is told at once, not after a long trace is read.
        status = _status(args)
        summary = _load(args.trace)
    except (StatusError, TraceError) as exc:
        print(f"rollout-proxy report: {exc}", file=sys.stderr)
        return 2
    if args.html is not None:
        try:
            args.html.write_text(render_html(summary, status), encoding="utf-8")
        except OSError as exc:
            print(f"rollout-proxy report: cannot write {args.html}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary_json(summary, status), indent=2))
    else:
        print(format_report(summary, status), end="")
    return 1 if failed(summary, status) else 0


def run_compare(args: argparse.Namespace) -> int:
    try:
        old, new = _load(args.old), _load(args.new)
    except TraceError as exc:
        print(f"rollout-proxy compare: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(compare_json(old, new), indent=2))
    else:
        print(format_compare(old, new), end="")
    return 1 if new.failed else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = subparsers.add_parser(
        "report", help="summarise a comparison trace against the success targets",
        description="Summarise a comparison trace against the rollout's success targets; with "
        "--admin-url or --status, also the plan's user targets (satisfaction, migration "
        "success, support tickets, adoption) and the shadow budget's use. "
        "Exit 0 when every target passes (no data neither passes nor fails), 1 when one "
        "fails, 2 when the trace is missing, empty or unreadable, or the status cannot be "
        "read.")
    report.add_argument("trace", type=Path, metavar="TRACE.jsonl",
                        help="the trace; its rotated siblings (TRACE.1, TRACE.2.gz, ...) are "
                        "read first, oldest first; gzip is read as such")
    report.add_argument("--html", type=Path, metavar="FILE",
                        help="also write a self-contained HTML page with charts")
    report.add_argument("--json", action="store_true", help="print the figures as JSON")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--admin-url", metavar="URL",
                        help="read the user targets and budget from GET URL/admin/status "
                        "(e.g. http://127.0.0.1:9090)")
    source.add_argument("--status", type=Path, metavar="FILE",
                        help="read them from a saved /admin/status JSON instead ('-': stdin)")
    report.set_defaults(func=run_report)
    compare = subparsers.add_parser(
        "compare", help="compare two comparison traces side by side",
        description="The report's figures for two traces side by side, with deltas. "
        "Exit 1 when the new trace fails a target, 2 when either is unreadable.")
    compare.add_argument("--old", type=Path, required=True, metavar="A.jsonl")
    compare.add_argument("--new", type=Path, required=True, metavar="B.jsonl")
    compare.add_argument("--json", action="store_true", help="print the figures as JSON")
    compare.set_defaults(func=run_compare)


def main(argv: list[str] | None = None) -> int:
    """The report and compare verbs on their own, as `rollout-proxy` runs them."""
    parser = argparse.ArgumentParser(prog="rollout-proxy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
