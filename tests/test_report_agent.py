"""`report` on the agent-aware figures (time to first byte, cost, noise) and, with
--status or --admin-url, the plan's user targets read from a proxy's /admin/status."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.offline import report
from proxy.offline.report_format import compare_changes, format_report, summary_json
from proxy.offline.report_html import render_html
from proxy.offline.report_stats import Summary
from proxy.offline.report_status import StatusFigures, read_status
from tests.conftest import TOKEN, Backend, config_dict, dead_url, running, serve_app
from tests.test_report import _png_pixels, line, rich_trace, summary_of, write

USER_KEYS = ("user_satisfaction", "migration_success", "support_tickets", "adoption")


def status_document(**changes: Any) -> dict[str, Any]:
    """A saved /admin/status, shaped as proxy/control/admin.py writes it: every user target passes.

    next_gen's mean score 4.5; migration 97 of 100; tickets over two days: legacy 10 / 1,000
    user-days (1 %), next_gen 15 / 1,000 (1.5 %), so 1.5x; the newest day's adoption 85 %.
    """
    document: dict[str, Any] = {
        "phase": "progressive", "percentage": 25.0, "config_version": "0123456789ab",
        "shadow": {"sample": 1.0, "budget": {
            "tokens_per_hour": 200000.0, "tokens_used": 50000.0, "tokens_left": 150000.0,
            "usd_per_hour": 5.0, "usd_used": 1.25, "usd_left": 3.75}},
        "feedback": {
            "legacy": {"count": 10, "mean_score": 3.9, "scores": {"3": 1, "4": 9}},
            "next_gen": {"count": 40, "mean_score": 4.5, "scores": {"4": 20, "5": 20}},
            "migration": {"success": 97, "failure": 3, "success_rate": 0.97}},
        "users": [
            {"day": "2026-11-25", "legacy": 150, "next_gen": 850, "adoption": 0.85,
             "tickets": {"complaints": {"legacy": 2, "next_gen": 12}, "legacy_rate": 0.0133,
                         "next_gen_rate": 0.0141, "ratio": 1.06}},
            {"day": "2026-11-24", "legacy": 850, "next_gen": 150, "adoption": 0.15,
             "tickets": {"complaints": {"legacy": 8, "next_gen": 3}, "legacy_rate": 0.0094,
                         "next_gen_rate": 0.02, "ratio": 2.13}},
        ],
    }
    for path, value in changes.items():
        *parents, key = path.split("__")
        into: Any = document
        for parent in parents:
            into = into[int(parent)] if isinstance(into, list) else into[parent]
        if value is DROP:
            del into[key]
        else:
            into[key] = value
    return document


DROP = object()


def user_targets(status: StatusFigures) -> dict[str, tuple[float | None, str]]:
    return {t.key: (t.measured, t.verdict) for t in status.targets}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = report.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def saved(tmp_path: Path, document: object, name: str = "status.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def good_trace(tmp_path: Path, n: int = 10) -> Path:
    return write(tmp_path / "t.jsonl", [line(i) for i in range(n)])


# --- time to first byte, cost, differing and noise paths --------------------------------


def side_rows(text: str) -> dict[str, list[float]]:
    """The backend table's rows: label -> [legacy, next_gen]."""
    table = text.split("\nbackend ")[1].split("\n\n")[0]
    return {row.split("  ")[0]: [float(v.replace(",", "")) for v in row.split()[-2:]]
            for row in table.splitlines()[1:] if "%" not in row}



def test_ttft_p50_and_p95_per_side() -> None:
    # legacy's first bytes at 1..100 ms, next_gen's at a tenth of that.
    entries = [line(i, old={"ttft_ms": float(i + 1)}, new={"ttft_ms": (i + 1) / 10})
               for i in range(100)]
    summary = summary_of(entries)
    data = summary_json(summary)
    assert data["legacy"]["ttft_ms"]["p50"] == pytest.approx(50.0, rel=0.02)
    assert data["legacy"]["ttft_ms"]["p95"] == pytest.approx(95.0, rel=0.02)
    assert data["next_gen"]["ttft_ms"]["p95"] == pytest.approx(9.5, rel=0.02)
    rows = side_rows(format_report(summary))
    assert rows["time to first byte p50 (ms)"] == pytest.approx([50.0, 5.0], rel=0.02)
    assert rows["time to first byte p95 (ms)"] == pytest.approx([95.0, 9.5], rel=0.02)


def test_an_error_has_no_time_to_first_byte() -> None:
    entries = [line(0, old={"ttft_ms": 900.0}, new={"ttft_ms": 90.0}),
               line(1, old={"ttft_ms": 900.0}, new={"status": None, "ttft_ms": 5.0})]
    ttft = summary_of(entries).overall.new.ttft
    assert (ttft.count, ttft.quantile(0.95)) == (1, 90.0)


def test_cost_per_request_total_and_saving() -> None:
    entries = [line(i, old={"cost_usd": 0.02}, new={"cost_usd": 0.005}) for i in range(8)]
    # A failed next_gen answer still cost money: it counts in the saving.
    entries.append(line(8, old={"cost_usd": 0.02}, new={"status": None, "cost_usd": 0.005}))
    # One side without a cost is left out of the saving, not taken as free.
    entries.append(line(9, old={"cost_usd": 0.02}))
    summary = summary_of(entries)
    assert summary.overall.cost_saving == pytest.approx(0.75)
    assert summary.overall.cost_pairs == 9
    data = summary_json(summary)
    assert data["cost"] == {"saving": pytest.approx(0.75), "comparisons": 9}
    assert data["legacy"]["cost_usd"]["total"] == pytest.approx(0.2)
    assert data["next_gen"]["cost_usd"]["mean"] == pytest.approx(0.005)
    text = format_report(summary)
    assert "cost saving, next_gen vs legacy: 75.0 % (" in text
    assert "9 comparisons with both costs" in text
    rows = side_rows(text)
    assert rows["cost per request (USD)"] == pytest.approx([0.02, 0.005])
    assert rows["cost total (USD)"] == pytest.approx([0.2, 0.045])
    before = summary_of([line(0, old={"cost_usd": 0.02}, new={"cost_usd": 0.01})])
    saving = next(c for c in compare_changes(before, summary) if c.key == "cost_saving")
    assert (saving.old, saving.new) == (pytest.approx(0.5), pytest.approx(0.75))


def test_no_cost_in_the_trace_means_no_saving_line() -> None:
    summary = summary_of([line(0)])
    assert summary.overall.cost_saving is None
    assert "cost saving" not in format_report(summary)
    assert summary_json(summary)["cost"] == {"saving": None, "comparisons": 0}


def test_top_differing_and_noise_paths_with_counts() -> None:
    entries = [line(i, match={"result": "mismatch", "shape": False,
                              "diff": ["steps[].selector", "usage.total_tokens"][: 1 + i % 2]})
               for i in range(6)]
    entries += [line(10 + i, match={"noise": ["id", "created"][: 1 + i % 2]}) for i in range(4)]
    summary = summary_of(entries)
    assert summary.diff_paths == (("steps[].selector", 6), ("usage.total_tokens", 3))
    assert summary.noise_paths == (("id", 4), ("created", 2))
    text = format_report(summary)
    rows = {r.split()[0]: r.split()[1:] for r in text.splitlines() if r.strip()}
    assert rows["steps[].selector"] == ["6", "100.0", "%"]  # of 6 mismatches
    assert rows["usage.total_tokens"] == ["3", "50.0", "%"]
    assert rows["id"] == ["4", "40.0", "%"]  # of 10 comparisons
    assert rows["created"] == ["2", "20.0", "%"]
    data = summary_json(summary)
    assert data["noise_paths"] == [{"path": "id", "count": 4}, {"path": "created", "count": 2}]
    assert data["noisy"] == 4
    page = render_html(summary)
    assert "Noise path (left out of mismatch)" in page and "<td>created</td>" in page


def html_section(page: str, section: str) -> str:
    """The HTML between <section id=...> and its </section>; the test fails without one."""
    start = page.index(f'<section id="{section}">')
    return page[start:page.index("</section>", start)]


def path_trace(tmp_path: Path, diff: str = "result", noise: str = "created") -> Path:
    """10 comparisons: 3 differ at `diff`, 5 match with `noise` left out, 2 plain matches."""
    entries: list[dict[str, Any] | str] = [
        line(i, match={"result": "mismatch", "shape": False, "diff": [diff]}) for i in range(3)]
    entries += [line(10 + i, match={"noise": [noise]}) for i in range(5)]
    entries += [line(20 + i) for i in range(2)]
    return write(tmp_path / "t.jsonl", entries)


def test_html_names_the_differing_field_and_the_noise_field_in_their_sections(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "report.html"
    code, _, _ = run(["report", str(path_trace(tmp_path)), "--html", str(page)], capsys)
    assert code in (0, 1)
    html = page.read_text(encoding="utf-8")
    differs, noise = html_section(html, "diff-paths"), html_section(html, "noise-paths")
    assert "<h2>Path that differs most</h2>" in differs
    assert "<th>JSON path</th><th>comparisons</th><th>of mismatches</th>" in differs
    assert "<td>result</td><td class=n>3</td><td class=n>100.0 %</td>" in differs
    assert "<h2>Noise path (left out of mismatch)</h2>" in noise
    assert "<th>JSON path</th><th>comparisons</th><th>of comparisons</th>" in noise
    assert "<td>created</td><td class=n>5</td><td class=n>50.0 %</td>" in noise
    assert "created" not in differs and "<td>result</td>" not in noise


def test_html_path_sections_match_the_text_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = str(path_trace(tmp_path))
    _, text, _ = run(["report", trace], capsys)
    run(["report", trace, "--html", str(tmp_path / "r.html")], capsys)
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    for section, header in (("diff-paths", "path that differs most"),
                            ("noise-paths", "noise path (left out of mismatch)")):
        rows = text.split(f"\n{header} ")[1].split("\n\n")[0].splitlines()[1:]
        cells = [row.split(maxsplit=2) for row in rows]
        assert cells and all(f"<td>{p}</td><td class=n>{n}</td><td class=n>{share}</td>"
                             in html_section(html, section) for p, n, share in cells)


def test_html_escapes_the_json_paths_from_the_trace(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    trace = path_trace(tmp_path, diff="steps[<blink>].selector", noise='meta."<marquee>"')
    run(["report", str(trace), "--html", str(tmp_path / "r.html")], capsys)
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<blink>" not in html and "<marquee>" not in html
    assert "<td>steps[&lt;blink&gt;].selector</td>" in html_section(html, "diff-paths")
    assert "<td>meta.&quot;&lt;marquee&gt;&quot;</td>" in html_section(html, "noise-paths")


def test_html_says_none_for_a_trace_without_differing_or_noise_paths() -> None:
    page = render_html(summary_of([line(i) for i in range(3)]))
    assert "<p>none</p>" in html_section(page, "diff-paths")
    assert "<p>none</p>" in html_section(page, "noise-paths")


# --- the user targets, from a status document -------------------------------------------


def test_a_status_where_every_user_target_passes() -> None:
    status = read_status(status_document(), "status.json")
    assert user_targets(status) == {
        "user_satisfaction": (4.5, "PASS"),
        "migration_success": (0.97, "PASS"),
        "support_tickets": (pytest.approx(1.5), "PASS"),  # 15/1000 over 10/1000
        "adoption": (0.85, "PASS"),  # the newest day's, not the day before's 15 %
    }
    assert [t.comparisons for t in status.targets] == [40, 100, 2000, 1000]
    assert not status.failed


@pytest.mark.parametrize(("changes", "key", "measured"), [
    ({"feedback__next_gen__mean_score": 3.9}, "user_satisfaction", 3.9),
    ({"feedback__next_gen__mean_score": 4.0}, "user_satisfaction", 4.0),  # > 4 is the target
    ({"feedback__migration__success_rate": 0.9}, "migration_success", 0.9),
    ({"users__0__tickets__complaints": {"legacy": 2, "next_gen": 30}}, "support_tickets",
     pytest.approx(3.3)),  # next_gen 33 / 1000 over legacy 10 / 1000
    ({"users__0__adoption": 0.8}, "adoption", 0.8),
])
def test_a_user_target_below_its_goal_fails(changes: dict[str, Any], key: str,
                                            measured: Any) -> None:
    status = read_status(status_document(**changes), "s")
    assert user_targets(status)[key] == (measured, "FAIL")
    assert status.failed


@pytest.mark.parametrize(("changes", "key"), [
    ({"feedback": DROP}, "user_satisfaction"),
    ({"feedback__next_gen": DROP}, "user_satisfaction"),
    ({"feedback__next_gen": {"count": 0, "mean_score": None, "scores": {}}},
     "user_satisfaction"),
    ({"feedback__migration": {"success_rate": None}}, "migration_success"),
    ({"users": []}, "support_tickets"),
    ({"users": []}, "adoption"),
    ({"users": DROP}, "adoption"),
    ({"users__0__tickets": DROP, "users__1__tickets": DROP}, "support_tickets"),
    ({"users__0__next_gen": 0, "users__1__next_gen": 0}, "support_tickets"),
    ({"users__0__adoption": None}, "adoption"),
])
def test_a_missing_section_is_no_data(changes: dict[str, Any], key: str) -> None:
    status = read_status(status_document(**changes), "s")
    assert user_targets(status)[key] == (None, "no data")
    assert not status.failed


def test_migration_success_rate_is_counted_when_only_the_counts_are_there() -> None:
    status = read_status(status_document(feedback__migration={"success": 19, "failure": 1}), "s")
    assert user_targets(status)["migration_success"] == (0.95, "FAIL")  # > 95 % is the target


def test_tickets_are_summed_over_the_days_before_dividing() -> None:
    # Per day the ratios are 1.06 and 2.13; their mean (1.6) is not the rate over both days.
    status = read_status(status_document(), "s")
    tickets = next(t for t in status.targets if t.key == "support_tickets")
    assert "next_gen 15 / 1,000, legacy 10 / 1,000" in tickets.basis


def test_tickets_against_a_ticket_free_legacy() -> None:
    none = {"legacy": 0, "next_gen": 0}
    quiet = status_document(users__0__tickets__complaints=none,
                            users__1__tickets__complaints=none)
    assert user_targets(read_status(quiet, "s"))["support_tickets"] == (0.0, "PASS")
    only_next_gen = status_document(users__0__tickets__complaints={"legacy": 0, "next_gen": 1},
                                    users__1__tickets__complaints=none)
    status = read_status(only_next_gen, "s")
    assert user_targets(status)["support_tickets"][1] == "FAIL"
    summary = summary_of([line(0)])
    assert "support tickets vs legacy" in format_report(summary, status)
    data = json.loads(json.dumps(summary_json(summary, status), allow_nan=False))
    tickets = next(t for t in data["targets"] if t["key"] == "support_tickets")
    assert (tickets["measured"], tickets["result"]) == (None, "FAIL")


def test_a_status_that_is_not_an_object_has_no_figures() -> None:
    documents: list[object] = [[], "x", None, {"feedback": [], "users": {"day": 1}, "shadow": 3}]
    for document in documents:
        status = read_status(document, "s")
        assert {t.verdict for t in status.targets} == {"no data"}
        assert status.budget is None and status.days == ()


def test_budget_use_is_shown_from_the_status() -> None:
    summary = summary_of([line(0)])
    text = format_report(summary, read_status(status_document(), "s"))
    assert ("shadow budget, USD per hour: 1.25 of 5.00 used (25.0 %), 3.75 left in the last "
            "hour") in text
    assert "shadow budget, tokens per hour: 50,000 of 200,000 used (25.0 %)" in text
    uncapped = status_document(shadow__budget={"tokens_per_hour": None, "usd_per_hour": None,
                                                "tokens_used": 0, "usd_used": 0})
    assert "shadow budget: no cap" in format_report(summary, read_status(uncapped, "s"))
    no_shadow = status_document(shadow__budget=None)
    assert "shadow budget: not in the status" in format_report(summary,
                                                               read_status(no_shadow, "s"))
    assert "shadow budget" not in format_report(summary)  # no status, no budget line


# --- the command line -------------------------------------------------------------------


def test_status_file_rows_read_as_an_operator_reads_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = saved(tmp_path, status_document())
    code, out, _ = run(["report", str(good_trace(tmp_path)), "--status", str(status)], capsys)
    rows = {r.split("  ")[0]: " ".join(r.split()) for r in out.splitlines()}
    assert code == 0
    assert rows["user satisfaction (next_gen)"].endswith("4.50 / 5 > 4 PASS 40")
    assert rows["migration success"].endswith("97.0 % > 95 % PASS 100")
    assert rows["support tickets vs legacy"].endswith("1.5x < 2x PASS 2,000")
    assert rows["adoption (latest day)"].endswith("85.0 % > 80 % PASS 1,000")
    assert "user_satisfaction (40 feedback scores): next_gen's mean feedback score" in out
    assert "2026-11-25" in out and "2026-11-24" in out  # the users per day table


def test_a_failing_user_target_fails_the_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = saved(tmp_path, status_document(feedback__next_gen__mean_score=3.9))
    code, out, _ = run(["report", str(good_trace(tmp_path)), "--status", str(status)], capsys)
    assert code == 1
    row = next(r for r in out.splitlines() if r.startswith("user satisfaction"))
    assert " ".join(row.split()).endswith("3.90 / 5 > 4 FAIL 40")


def test_user_targets_without_figures_neither_pass_nor_fail(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = saved(tmp_path, {"phase": "shadow", "percentage": 0})
    code, out, _ = run(["report", str(good_trace(tmp_path)), "--status", str(status),
                        "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["passed"] is True
    by_key = {t["key"]: t for t in data["targets"]}
    assert [by_key[k]["result"] for k in USER_KEYS] == ["no data"] * 4
    assert {by_key[k]["source"] for k in USER_KEYS} == {"status"}
    assert by_key["token_reduction"]["source"] == "trace"
    code, text, _ = run(["report", str(good_trace(tmp_path)), "--status", str(status)], capsys)
    rows = [r for r in text.splitlines() if r.startswith(("user satisfaction", "adoption ("))]
    assert len(rows) == 2 and all("no data" in r for r in rows)


def test_json_carries_the_user_targets_and_the_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = saved(tmp_path, status_document(users__0__adoption=0.75))
    code, out, _ = run(["report", str(good_trace(tmp_path)), "--status", str(status),
                        "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and data["passed"] is False
    assert [t["key"] for t in data["targets"]][4:] == list(USER_KEYS)
    adoption = data["targets"][7]
    assert (adoption["measured"], adoption["result"], adoption["counts"]) == (
        0.75, "FAIL", "users")
    assert data["status"]["source"] == str(status)
    assert data["status"]["budget"]["usd_used"] == 1.25
    assert [d["day"] for d in data["status"]["users"]] == ["2026-11-25", "2026-11-24"]


def test_without_a_status_there_are_no_user_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["report", str(good_trace(tmp_path)), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["status"] is None and len(data["targets"]) == 4


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read the status file"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
])
def test_an_unreadable_status_file_exits_2_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
        message: str) -> None:
    status = tmp_path / "status.json"
    if content is not None:
        status.write_text(content)
    code, out, err = run(["report", str(good_trace(tmp_path)), "--status", str(status)], capsys)
    assert (code, out) == (2, "")
    assert str(status) in err and message in err


def test_admin_url_and_status_file_are_one_or_the_other(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        report.main(["report", "t.jsonl", "--status", "s.json", "--admin-url", "http://x"])
    assert exited.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


async def status_server(document: object, status: int = 200) -> tuple[web.AppRunner, str,
                                                                         list[str]]:
    asked: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        asked.append(f"{request.method} {request.path}")
        return web.Response(status=status, text=json.dumps(document),
                            content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, url = await serve_app(app)
    return runner, url, asked


async def report_in_thread(argv: list[str]) -> int:
    # urllib blocks: run the CLI off the loop that serves the status.
    return await asyncio.to_thread(report.main, argv)


async def test_admin_url_fetches_the_status(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    runner, url, asked = await status_server(status_document())
    try:
        code = await report_in_thread(["report", str(good_trace(tmp_path)), "--admin-url",
                                       url + "/", "--json"])
    finally:
        await runner.cleanup()
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and asked == ["GET /admin/status"]
    assert data["status"]["source"] == f"{url}/admin/status"
    assert [t["result"] for t in data["targets"][4:]] == ["PASS"] * 4


async def test_admin_url_without_a_scheme_is_taken_as_http(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner, url, asked = await status_server(status_document(users__0__adoption=0.5))
    try:
        code = await report_in_thread(["report", str(good_trace(tmp_path)), "--admin-url",
                                       url.removeprefix("http://")])
    finally:
        await runner.cleanup()
    assert code == 1 and asked == ["GET /admin/status"]
    assert "adoption (latest day)" in capsys.readouterr().out


async def test_unreachable_admin_url_exits_2_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = dead_url()
    code = await report_in_thread(["report", str(good_trace(tmp_path)), "--admin-url", url])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert f"cannot fetch {url}/admin/status" in err


@pytest.mark.parametrize(("document", "status", "message"), [
    ({"error": "boom"}, 500, "HTTP 500"),
    ({"error": "not here"}, 404, "HTTP 404"),
    (["not", "a", "status"], 200, "not a JSON object"),
])
async def test_admin_url_that_does_not_answer_a_status_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], document: object, status: int,
        message: str) -> None:
    runner, url, _ = await status_server(document, status)
    try:
        code = await report_in_thread(["report", str(good_trace(tmp_path)), "--admin-url", url])
    finally:
        await runner.cleanup()
    _, err = capsys.readouterr()
    assert code == 2
    assert f"{url}/admin/status" in err and message in err


async def test_a_status_that_never_comes_is_given_up_after_the_timeout() -> None:
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/admin/status", stall)
    runner, url = await serve_app(app)
    try:
        with pytest.raises(report.StatusError, match=f"cannot fetch {url}/admin/status"):
            await asyncio.to_thread(report.fetch_status, url, 0.3)
    finally:
        never.set()
        await runner.cleanup()
    assert report.STATUS_TIMEOUT_S == 10.0


async def test_reads_the_status_a_real_proxy_serves(
        tmp_path: Path, backends: dict[str, Backend],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Feedback, complaints and users through the real admin API, read back by report."""
    data = config_dict(backends["legacy"].url, backends["next_gen"].url,
                       rollout={"phase": "opt_in"})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running(tmp_path, data) as proxy, aiohttp.ClientSession() as http:
        served: dict[str, list[str]] = {"legacy": [], "next_gen": []}
        for n in range(20):  # 5 users on legacy, 15 who opted in to next_gen
            on_next_gen = n >= 5
            headers = {"X-User-Id": f"user-{n}", "X-Next-Gen": "1" if on_next_gen else "0"}
            async with http.post(proxy.url + "/v1/tasks", json={}, headers=headers) as answer:
                served[answer.headers["X-Rollout-Backend"]].append(
                    answer.headers["X-Request-Id"])
        assert [len(served["legacy"]), len(served["next_gen"])] == [5, 15]
        said = [("feedback", {"request_id": served["next_gen"][0], "score": 5,
                              "migrated": True}),
                ("feedback", {"request_id": served["next_gen"][1], "score": 4,
                              "migrated": True}),
                ("feedback", {"request_id": served["legacy"][0], "score": 2}),
                ("complaints", {"request_id": served["legacy"][1], "text": "slow"}),
                ("complaints", {"request_id": served["next_gen"][2], "text": "odd"})]
        for verb, body in said:
            async with http.post(f"{proxy.admin}/admin/{verb}", json=body,
                                 headers=auth) as answer:
                assert answer.status == 200, await answer.text()
        code = await report_in_thread(["report", str(good_trace(tmp_path)), "--admin-url",
                                       proxy.admin, "--json"])
    out = json.loads(capsys.readouterr().out)
    by_key = {t["key"]: t for t in out["targets"]}
    assert by_key["user_satisfaction"]["measured"] == 4.5
    assert by_key["migration_success"]["measured"] == 1.0
    # next_gen 1 / 15 users, legacy 1 / 5: a third of legacy's rate.
    assert by_key["support_tickets"]["measured"] == pytest.approx(1 / 3)
    assert by_key["adoption"]["measured"] == 0.75
    assert [by_key[k]["result"] for k in USER_KEYS] == ["PASS", "PASS", "PASS", "FAIL"]
    assert code == 1


# --- HTML -------------------------------------------------------------------------------


def html_summary() -> tuple[Summary, StatusFigures]:
    entries = rich_trace(300)
    for i, entry in enumerate(entries):
        assert isinstance(entry, dict)
        entry["old_system"]["cost_usd"] = 0.02
        entry["new_system"]["cost_usd"] = 0.004
        entry["match"] = {**entry["match"], "noise": ["id"] if i % 3 == 0 else []}
    document = status_document()
    document["users"] = [copy.deepcopy(document["users"][0]) | {
        "day": f"2026-11-{25 - k:02d}", "adoption": round(0.85 - 0.05 * k, 4)}
        for k in range(10)]
    return summary_of(entries), read_status(document, "status.json")


def test_html_has_the_adoption_chart_and_cost_rows_when_given_a_status() -> None:
    summary, status = html_summary()
    page = render_html(summary, status)
    assert page.count("<svg") == 6  # the five charts and adoption per day
    assert 'aria-label="Adoption per day' in page and "goal 80%" in page
    assert page.count("<circle") == 10  # one dot per day
    assert 'aria-label="Time to first byte' in page
    assert "<td>cost saving, next_gen vs legacy</td><td>80.0 %" in page
    assert "<td>cost per request (USD)</td>" in page
    assert "1.25 of 5.00 used (25.0 %)" in page
    assert "user satisfaction (next_gen)" in page and "40 feedback scores" in page
    assert "<script" not in page and "default-src 'none'" in page
    plain = render_html(summary)
    assert plain.count("<svg") == 5 and "Adoption" not in plain


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium)")
def test_html_with_status_renders_in_headless_chromium(tmp_path: Path) -> None:
    summary, status = html_summary()
    page = tmp_path / "report.html"
    page.write_text(render_html(summary, status), encoding="utf-8")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()],
        capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})
    console = [x for x in done.stderr.splitlines() if "CONSOLE" in x or "Uncaught" in x]
    assert console == [], console
    width, height, bpp, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1400)
    # The adoption chart sits in the charts' third row, right column: next_gen's orange
    # (#f28e2b) line and dots must be drawn there.
    orange = sum(1 for row in rows[700:1400] for x in range(600 * bpp, width * bpp, bpp)
                 if abs(row[x] - 0xF2) < 24 and abs(row[x + 1] - 0x8E) < 24
                 and abs(row[x + 2] - 0x2B) < 24)
    assert orange > 200, "no adoption line in the lower right of the charts"
