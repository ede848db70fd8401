"""`rollout-proxy report` and `compare` on synthetic traces with known answers."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.offline import report
from proxy.offline.report_format import compare_changes, format_report, summary_json
from proxy.offline.report_html import render_html
from proxy.offline.report_stats import (
    MAX_PREFIXES,
    MAX_TIME_BUCKETS,
    OTHER,
    TOP_N,
    LogHistogram,
    Summary,
    summarise,
)
from proxy.offline.report_trace import parse_line, path_prefix
from proxy.telemetry.compare import compare
from proxy.telemetry.observe import Measurement
from proxy.telemetry.record import match_fields, side_fields

ROOT = Path(__file__).resolve().parent.parent


def line(i: int = 0, **changes: Any) -> dict[str, Any]:
    """One comparison: legacy 5000 ms / 12,000 tokens, next_gen 500 ms / 1,200 tokens."""
    entry: dict[str, Any] = {
        "execution_id": f"req-{i}", "ts": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
        "method": "POST", "path": "/v1/tasks",
        "old_system": {"status": 200, "time_ms": 5000.0, "tokens": 12000, "success": True,
                       "memory_mb": None, "bytes": 312},
        "new_system": {"status": 200, "time_ms": 500.0, "tokens": 1200, "success": True,
                       "memory_mb": None, "bytes": 298},
        "match": {"status": True, "success": True, "shape": True, "diff": []},
    }
    for key, value in changes.items():
        if key in ("old", "new"):
            entry[f"{key}_system"] = None if value is None else {**entry[f"{key}_system"], **value}
        elif key == "match":
            entry["match"] = {**entry["match"], **value}
        else:
            entry[key] = value
    return entry


def write(path: Path, entries: list[dict[str, Any] | str], opener: Any = open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for entry in entries:
            f.write(entry if isinstance(entry, str) else json.dumps(entry) + "\n")
    return path


def summary_of(entries: Sequence[dict[str, Any] | str]) -> Summary:
    data = [(e if isinstance(e, str) else json.dumps(e) + "\n").encode() for e in entries]
    return summarise(("t.jsonl", n, d) for n, d in enumerate(data, 1))


def target(summary: Summary, key: str) -> tuple[float | None, str, int]:
    found = next(t for t in summary.overall.targets if t.key == key)
    return found.measured, found.verdict, found.comparisons


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = report.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- figures ---------------------------------------------------------------------------


def test_known_trace_passes_token_and_speed_targets() -> None:
    summary = summary_of([line(i) for i in range(100)])
    assert target(summary, "token_reduction") == (pytest.approx(0.9), "PASS", 100)
    assert target(summary, "speed") == (pytest.approx(10.0), "PASS", 100)
    assert target(summary, "success_rate") == (1.0, "PASS", 100)
    assert target(summary, "memory") == (None, "no data", 0)
    assert not summary.failed


def test_speed_uses_medians_not_means() -> None:
    # One 500 s outlier would drag a mean ratio up; the median stays at 10x.
    entries = [line(i) for i in range(99)] + [line(99, old={"time_ms": 500_000.0})]
    measured, _, _ = target(summary_of(entries), "speed")
    assert measured == pytest.approx(10.0, rel=0.01)  # a mean ratio would be 19.9


def test_token_reduction_only_counts_lines_where_both_sides_have_tokens() -> None:
    entries = [line(0), line(1, new={"tokens": None}), line(2, old={"tokens": None})]
    assert target(summary_of(entries), "token_reduction") == (pytest.approx(0.9), "PASS", 1)


def test_memory_target_is_mean_ratio() -> None:
    good = summary_of([line(i, old={"memory_mb": 800}, new={"memory_mb": 200})
                       for i in range(10)])
    bad = summary_of([line(i, old={"memory_mb": 800}, new={"memory_mb": 600})
                      for i in range(10)])
    assert target(good, "memory") == (pytest.approx(0.25), "PASS", 10)
    assert target(bad, "memory")[1] == "FAIL"


def test_next_gen_error_is_a_failed_answer_and_its_own_mismatch_kind() -> None:
    entries = [line(i) for i in range(8)] + [
        line(8, new={"status": None, "time_ms": 60000.0, "tokens": None, "success": None}),
        line(9, new={"error": "connection reset"}),
    ]
    summary = summary_of(entries)
    overall = summary.overall
    assert (overall.matches, overall.mismatches, overall.errors) == (8, 0, 2)
    assert overall.kind_counts() == {"status": 0, "success": 0, "shape": 0, "error": 2}
    assert target(summary, "success_rate") == (pytest.approx(0.8), "FAIL", 10)
    # An error's time is not a latency: next_gen's p99 stays at 500 ms.
    assert overall.new.latency.quantile(0.99) == 500.0
    assert {e.detail for e in summary.worst if e.kind == "error"} == {
        "no status", "connection reset"}


def test_mismatch_kinds_are_counted_separately() -> None:
    entries = [
        line(0, new={"status": 503, "success": False},
             match={"status": False, "success": False}),
        line(1, match={"shape": False, "diff": ["usage.total_tokens", "steps"]}),
        line(2, match={"shape": False, "diff": ["usage.total_tokens"], "noise": ["id"]}),
        line(3),
    ]
    summary = summary_of(entries)
    assert summary.overall.kind_counts() == {"status": 1, "success": 1, "shape": 2, "error": 0}
    assert summary.overall.mismatches == 3
    assert summary.overall.noisy == 1
    assert summary.diff_paths == (("usage.total_tokens", 2), ("steps", 1))
    assert summary.noise_paths == (("id", 1),)
    shapes = [e for e in summary.worst if e.kind == "shape"]
    assert [e.execution_id for e in shapes] == ["req-1", "req-2"]  # more differing paths first


def test_reads_the_lines_the_proxy_writes() -> None:
    # Built as proxy/datapath/shadow.py builds them, so a change there shows up here.
    old = Measurement(200, 5000.0, None, 312, 12000, True, None)
    ok = Measurement(200, 500.0, None, 298, 1200, True, None)
    failed = Measurement(None, 60000.0, None, 0, None, None, None, error="timeout")
    records: list[dict[str, Any] | str] = []
    for i, (new, body) in enumerate([(ok, {"a": 1}), (ok, {"a": "x"}), (failed, None)]):
        records.append({
            "execution_id": f"r{i}", "ts": "2024-01-01T00:00:00.000Z", "method": "POST",
            "path": "/v1/tasks", "old_system": side_fields(old),
            "new_system": side_fields(new),
            "match": match_fields(compare(old, {"a": 1}, new, body, frozenset()))})
    summary = summary_of(records)
    overall = summary.overall
    assert (overall.matches, overall.mismatches, overall.errors) == (1, 1, 1)
    assert overall.kind_counts() == {"status": 0, "success": 0, "shape": 1, "error": 1}
    assert len(summary.diff_paths) == 1 and "<no answer>" not in dict(summary.diff_paths)
    assert [e.detail for e in summary.worst if e.kind == "error"] == ["timeout"]
    assert target(summary, "token_reduction") == (pytest.approx(0.9), "PASS", 2)


def test_optional_ttft_and_cost_are_reported_where_present() -> None:
    entries = [line(i, old={"ttft_ms": 900.0, "cost_usd": 0.003},
                    new={"ttft_ms": 90.0, "cost_usd": 0.0004}) for i in range(4)]
    data = summary_json(summary_of(entries))
    assert data["legacy"]["ttft_ms"]["p50"] == 900.0
    assert data["next_gen"]["cost_usd"]["total"] == pytest.approx(0.0016)
    text = format_report(summary_of(entries))
    assert "time to first byte p50 (ms)" in text and "cost per request (USD)" in text
    assert "time to first byte" not in format_report(summary_of([line(0)]))


def test_per_prefix_figures_and_bounded_prefix_count() -> None:
    entries = [line(i, path=f"/p{i}/x/{i}") for i in range(MAX_PREFIXES + 5)]
    entries += [line(99, path="/v1/tasks/123", new={"tokens": 6000})]
    summary = summary_of(entries)
    names = [name for name, _ in summary.prefixes]
    assert len(names) == MAX_PREFIXES + 1 and names[-1] == OTHER
    assert dict(summary.prefixes)[OTHER].comparisons == 6  # five late /pN/x, and /v1/tasks


@pytest.mark.parametrize(("path", "prefix"), [
    ("/v1/tasks", "/v1/tasks"),
    ("/v1/tasks/123/steps", "/v1/tasks"),
    ("/tasks/123", "/tasks"),
    ("/sessions/3f2a9c81deadbeef/steps", "/sessions"),
    ("/v1/tasks?user=42", "/v1/tasks"),
    ("/", "/"),
    ("/123e4567-e89b-12d3-a456-426614174000", "/"),
])
def test_path_prefix_stops_at_ids(path: str, prefix: str) -> None:
    assert path_prefix(path) == prefix


def test_worst_mismatches_keep_only_top_n_per_kind() -> None:
    entries = [line(i, match={"shape": False, "diff": [f"p{j}" for j in range(i % 37 + 1)]})
               for i in range(500)]
    worst = [e for e in summary_of(entries).worst if e.kind == "shape"]
    assert len(worst) == TOP_N
    assert [e.score for e in worst] == [37.0] * TOP_N
    assert worst[0].execution_id == "req-36"  # ties keep the earliest


def test_timeline_buckets_stay_bounded_over_a_long_trace() -> None:
    entries = [line(i, ts=f"2024-{1 + i // 672:02d}-{1 + i // 24 % 28:02d}T{i % 24:02d}:00:00Z")
               for i in range(2000)]
    timeline = summary_of(entries).timeline
    assert len(timeline.buckets) <= MAX_TIME_BUCKETS
    assert sum(b.comparisons for b in timeline.buckets) == 2000
    assert timeline.width_s > 3600


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=1e7), min_size=1, max_size=400),
       st.sampled_from([0.5, 0.9, 0.99]))
def test_quantiles_are_within_two_percent(values: list[float], q: float) -> None:
    histogram = LogHistogram()
    for value in values:
        histogram.add(value)
    ordered = sorted(values)
    exact = ordered[max(1, -(-int(q * 1_000_000) * len(ordered) // 1_000_000)) - 1]
    estimate = histogram.snapshot().quantile(q)
    assert estimate is not None
    assert abs(estimate - exact) <= 0.0201 * exact


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), [
    ("not json\n", "not JSON"),
    ("[1, 2]\n", "not a JSON object"),
    ('{"new_system": {}}\n', "no old_system object"),
    ('{"old_system": {}, "new_system": 3}\n', "new_system is not an object"),
    ('{"old_system": {"status": 200, "ti', "not JSON"),
])
def test_bad_line_reasons(text: str, reason: str) -> None:
    parsed = parse_line(text.encode())
    assert isinstance(parsed, str) and parsed.startswith(reason)


def test_corrupt_and_truncated_lines_are_counted_not_fatal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.jsonl", [
        line(0), "garbage\n", "\n", line(1), b"\xff\xfe\n".decode("latin-1"),
        '{"execution_id": "cut", "old_sys'])
    code, out, _ = run(["report", str(trace), "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert (data["comparisons"], data["bad_lines"]) == (2, 3)
    assert data["first_bad_line"].startswith("t.jsonl:2: not JSON")


def test_empty_trace_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.jsonl", ["\n", "  \n"])
    code, out, err = run(["report", str(trace)], capsys)
    assert (code, out) == (2, "")
    assert "empty" in err


def test_missing_trace_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["report", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "no such trace" in err


def test_unreadable_trace_exits_2_naming_first_bad_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.jsonl", ["\n", "status,time\n", "200,5\n"])
    code, _, err = run(["report", str(trace)], capsys)
    assert code == 2 and "t.jsonl:2: not JSON" in err


# --- files -----------------------------------------------------------------------------


def test_gzip_trace_is_read_whatever_its_name(tmp_path: Path) -> None:
    write(tmp_path / "t.jsonl.gz", [line(i) for i in range(5)], opener=gzip.open)
    shutil.copy(tmp_path / "t.jsonl.gz", tmp_path / "renamed.jsonl")
    for name in ("t.jsonl.gz", "renamed.jsonl"):
        assert report.read_trace(tmp_path / name).overall.comparisons == 5


def test_rotated_siblings_are_read_oldest_first(tmp_path: Path) -> None:
    base = tmp_path / "comparisons.jsonl"
    write(tmp_path / "comparisons.jsonl.2.gz", [line(0, execution_id="oldest", new={
        "status": 500, "success": False}, match={"status": False})], opener=gzip.open)
    write(tmp_path / "comparisons.jsonl.1", [line(1, new={"status": 500, "success": False},
                                                  match={"status": False})])
    # Mid-compression both exist; the plain file is the whole one.
    (tmp_path / "comparisons.jsonl.1.gz").write_bytes(b"\x1f\x8b partial")
    write(base, [line(2)])
    (tmp_path / "comparisons.jsonl.bak").write_text("ignored\n")
    assert [p.name for p in report.trace_files(base)] == [
        "comparisons.jsonl.2.gz", "comparisons.jsonl.1", "comparisons.jsonl"]
    summary = report.read_trace(base)
    assert summary.overall.comparisons == 3 and summary.bad_lines == 0
    assert summary.worst[0].execution_id == "oldest"  # equal scores: the earliest read wins


def test_rotated_siblings_are_read_when_the_live_file_is_gone(tmp_path: Path) -> None:
    write(tmp_path / "c.jsonl.1", [line(0)])
    assert report.read_trace(tmp_path / "c.jsonl").overall.comparisons == 1


def test_truncated_gzip_is_a_read_problem_not_fatal(tmp_path: Path) -> None:
    whole = gzip.compress("".join(json.dumps(line(i)) + "\n" for i in range(400)).encode())
    (tmp_path / "c.jsonl.1.gz").write_bytes(whole[: len(whole) // 2])
    write(tmp_path / "c.jsonl", [line(999)])
    summary = report.read_trace(tmp_path / "c.jsonl")
    assert 1 < summary.overall.comparisons < 401
    assert len(summary.read_problems) == 1 and "c.jsonl.1.gz" in summary.read_problems[0]


def test_large_trace_is_summarised_in_bounded_memory(tmp_path: Path) -> None:
    trace = tmp_path / "big.jsonl"
    template = json.dumps(line(0)).replace("req-0", "req-%d").replace("5000.0", "%d.0")
    with trace.open("w") as f:
        f.writelines(template % (i, 4000 + i % 2000) + "\n" for i in range(150_000))
    script = (
        "import resource, sys; from pathlib import Path\n"
        "from proxy.offline.report import read_trace\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "s = read_trace(Path(sys.argv[1]))\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(s.overall.comparisons, grown)\n")
    done = subprocess.run([sys.executable, "-c", script, str(trace)], capture_output=True,
                          text=True, check=True, timeout=120, cwd=ROOT)
    comparisons, grown_kib = map(int, done.stdout.split())
    assert comparisons == 150_000
    # The file is ~50 MB; holding its lines or parsed objects would grow by far more.
    assert grown_kib < 30_000


def test_tracemalloc_peak_does_not_grow_with_the_trace() -> None:
    data = [(json.dumps(line(i, path=f"/v1/tasks/{i}")) + "\n").encode() for i in range(8000)]
    tracemalloc.start()
    try:
        summary = summarise(("t", n, d) for n, d in enumerate(data, 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.overall.comparisons == 8000
    assert peak < 1_000_000  # 8,000 lines of ~330 bytes: keeping them would pass 2.6 MB


def test_progress_bar_draws_on_a_clock_not_per_line() -> None:
    assert report.format_progress(50, 100, 1234, width=10) == "\r[#####.....]  50%  1,234 lines"
    now = [0.0]
    stream = io.StringIO()
    bar = report.ProgressBar(100, stream, clock=lambda: now[0])
    bar(10, 1)
    bar(20, 2)  # within 0.2 s: not redrawn
    now[0] = 1.0
    bar(30, 3)
    bar.close()
    assert stream.getvalue().count("lines") == 2 and stream.getvalue().endswith("\r")


# --- output and exit codes -------------------------------------------------------------


def test_failed_target_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.jsonl", [line(i, new={"tokens": 6000}) for i in range(10)])
    code, out, _ = run(["report", str(trace)], capsys)
    assert code == 1
    row = next(r for r in out.splitlines() if r.startswith("token reduction"))
    assert "50.0 %" in row and row.split()[-2:] == ["FAIL", "10"]


def test_text_report_shows_targets_with_their_basis(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.jsonl", [line(i) for i in range(12)])
    code, out, _ = run(["report", str(trace)], capsys)
    assert code == 0
    rows = {r.split("  ")[0]: r for r in out.splitlines()}
    assert rows["token reduction, new vs old"].split()[-7:] == [
        "90.0", "%", ">", "80", "%", "PASS", "12"]
    assert rows["speed improvement (old / new time)"].split()[-5:] == [
        "10.0x", ">", "5x", "PASS", "12"]
    assert "no data" in rows["next_gen memory vs legacy"]
    assert "median legacy time_ms / median next_gen time_ms" in out


def test_json_output_parses_and_carries_every_section(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.jsonl", [line(i) for i in range(3)])
    code, out, _ = run(["report", str(trace), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["passed"] is True
    assert [t["result"] for t in data["targets"]] == ["PASS", "PASS", "PASS", "no data"]
    assert {"legacy", "next_gen", "prefixes", "worst", "timeline", "mismatch_by_kind"} <= set(data)
    assert data["legacy"]["latency_ms"]["p50"] == 5000.0


def test_compare_shows_deltas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write(tmp_path / "a.jsonl", [line(i, new={"tokens": 6000, "time_ms": 2500.0})
                                       for i in range(10)])
    new = write(tmp_path / "b.jsonl", [line(i) for i in range(10)])
    code, out, _ = run(["compare", "--old", str(old), "--new", str(new), "--json"], capsys)
    figures = {f["key"]: f for f in json.loads(out)["figures"]}
    assert code == 0
    assert figures["target.token_reduction"]["delta"] == pytest.approx(0.4)
    assert figures["target.token_reduction"]["targets"] == "FAIL → PASS"
    assert figures["target.speed"]["old"] == pytest.approx(2.0)
    assert figures["next_gen.latency_p50_ms"]["delta"] == pytest.approx(-2000.0)
    code, text, _ = run(["compare", "--old", str(old), "--new", str(new)], capsys)
    assert "+40.0 pp" in text and "FAIL → PASS" in text


def test_compare_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good.jsonl", [line(0)])
    bad = write(tmp_path / "bad.jsonl", [line(0, new={"tokens": 11000})])
    assert run(["compare", "--old", str(good), "--new", str(bad)], capsys)[0] == 1
    assert run(["compare", "--old", str(bad), "--new", str(tmp_path / "x")], capsys)[0] == 2
    keys = [c.key for c in compare_changes(report.read_trace(good), report.read_trace(bad))]
    assert "legacy.memory_mean_mb" not in keys  # neither trace reports memory


def test_register_wires_both_subcommands() -> None:
    parser = argparse.ArgumentParser(prog="rollout-proxy")
    report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "t.jsonl", "--html", "r.html", "--json"])
    assert args.func is report.run_report and args.html == Path("r.html") and args.json
    args = parser.parse_args(["compare", "--old", "a", "--new", "b"])
    assert args.func is report.run_compare and not args.json
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["compare", "--old", "a"])
    assert exited.value.code == 2


# --- HTML ------------------------------------------------------------------------------


def rich_trace(n: int) -> list[dict[str, Any] | str]:
    rng = random.Random(7)
    entries: list[dict[str, Any] | str] = []
    for i in range(n):
        old_ms, new_ms = rng.lognormvariate(8.3, 0.5), rng.lognormvariate(6.2, 0.6)
        changes: dict[str, Any] = {
            "path": rng.choice(["/v1/tasks", "/v1/sessions/9/steps", "/<script>alert(1)</script>"]),
            "ts": f"2024-01-01T{i // 600:02d}:{i // 10 % 60:02d}:00Z",
            "old": {"time_ms": old_ms, "ttft_ms": old_ms / 2, "tokens": int(old_ms * 3)},
            "new": {"time_ms": new_ms, "ttft_ms": new_ms / 5, "tokens": int(new_ms * 2)},
        }
        if i % 17 == 0:
            changes["new"] = {"status": None, "error": "timeout"}
        elif i % 11 == 0:
            changes["match"] = {"shape": False, "diff": ["usage.total_tokens"]}
        entries.append(line(i, **changes))
    return entries


def test_html_is_self_contained_and_escapes_trace_text() -> None:
    page = render_html(summary_of(rich_trace(300)))
    assert page.startswith("<!doctype html>")
    assert "<script" not in page  # the path "/<script>..." appears only escaped
    assert "&lt;script&gt;" in page
    for reference in ("src=", "href=", "url(", "@import", "http:", "https:"):
        assert reference not in page
    assert "default-src 'none'" in page
    assert page.count("<svg") == 5  # latency, tokens, success, mismatch, time to first byte


def _unfilter(kind: int, row: bytearray, prev: bytes, bpp: int) -> bytes:
    """Undo one PNG scanline filter (RFC 2083 section 6)."""
    for i in range(len(row) if kind else 0):
        a = row[i - bpp] if i >= bpp else 0
        b, c = prev[i], prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            row[i] = (row[i] + a) & 255
        elif kind == 2:
            row[i] = (row[i] + b) & 255
        elif kind == 3:
            row[i] = (row[i] + (a + b) // 2) & 255
        elif kind == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return bytes(row)


def _png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """Width, height, bytes per pixel and rows of an 8-bit non-interlaced RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        header = chunk if kind == b"IHDR" else header
        idat += chunk if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and interlace == 0 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        prev = _unfilter(raw[start], bytearray(raw[start + 1:start + 1 + stride]), prev, bpp)
        rows.append(prev)
    return width, height, bpp, rows


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium)")
def test_html_page_renders_in_headless_chromium_without_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    trace = write(tmp_path / "t.jsonl", rich_trace(600))
    assert report.main(["report", str(trace), "--html", str(page)]) in (0, 1)
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})
    console = [x for x in done.stderr.splitlines() if "CONSOLE" in x or "Uncaught" in x]
    assert console == [], console
    width, height, bpp, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 900)
    pixels = [row[x:x + 3] for row in rows[::3] for x in range(0, width * bpp, bpp * 3)]
    colours = set(pixels)
    inked = sum(p != b"\xff\xff\xff" for p in pixels)
    assert len(colours) > 50, "the screenshot is nearly blank"
    assert inked > len(pixels) // 20
