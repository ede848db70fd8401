"""config/alerts.yml and config/grafana-dashboard.json: valid, and only about our metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIG = Path(__file__).resolve().parent.parent / "config"
ALERTS = CONFIG / "alerts.yml"
DASHBOARD = CONFIG / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

HISTOGRAMS = {"rollout_request_duration_seconds", "rollout_memory_bytes",
              "rollout_time_to_first_byte_seconds"}
METRICS = HISTOGRAMS | {
    "rollout_requests_total", "rollout_tokens_total", "rollout_shadow_comparisons_total",
    "rollout_shadow_dropped_total", "rollout_fallbacks_total", "rollout_percentage",
    "rollout_phase", "rollout_rollbacks_total", "rollout_config_reloads_total",
    "rollout_circuit_state", "rollout_guard_state", "rollout_in_flight_requests",
    "rollout_cost_usd_total", "up",
}
KNOWN = METRICS | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "offset", "bool", "inf", "nan"}

promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                              reason="promtool is not installed (apt-get install prometheus)")


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, labels, keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return {n for n in names if n.lower() not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]", n)}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in board["annotations"]["list"]]


# --- alerts ----------------------------------------------------------------------------


@promtool
def test_alert_rules_pass_promtool_check() -> None:
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@promtool
def test_alert_rules_unit_tests_pass() -> None:
    done = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=CONFIG,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_for_severity_summary_and_description() -> None:
    for rule in alert_rules():
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_mirror_the_guards() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {"RolloutNextGenErrorRateHigh", "RolloutNextGenLatencyDegraded",
            "RolloutNextGenMemorySpike", "RolloutShadowDropping", "RolloutProxyDown",
            "RolloutRolledBack"} <= names


def test_alerts_use_only_our_metrics() -> None:
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= KNOWN, rule["alert"]


# --- dashboard -------------------------------------------------------------------------


def test_dashboard_has_a_prometheus_datasource_variable_and_no_inputs() -> None:
    board = dashboard()
    assert "__inputs" not in board and "__requires" not in board
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    board = dashboard()
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for annotation in board["annotations"]["list"]:
        assert annotation["datasource"] == DATASOURCE


def test_no_hard_coded_datasource_uid() -> None:
    def uids(node: Any, top: bool = False) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "uid" and not top:  # the dashboard's own uid is its stable URL
                    yield value
                yield from uids(value)
        elif isinstance(node, list):
            for item in node:
                yield from uids(item)

    assert set(uids(dashboard(), top=True)) == {"${datasource}"}


def test_panels_have_unique_ids_and_fit_the_grid_without_overlap() -> None:
    laid = list(panels(dashboard()))
    ids = [p["id"] for p in laid]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in laid:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_dashboard_queries_use_only_our_metrics_and_cover_them() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs(dashboard()):
        names = metric_names(expr)
        assert names, expr
        assert names <= KNOWN, expr
        used |= names
    families = {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count"))
                and re.sub(r"_(bucket|sum|count)$", "", n) in HISTOGRAMS else n for n in used}
    assert families == METRICS


@promtool
def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # promtool parses recording rules; Grafana's variables become what they expand to.
    exprs = [e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
             for e in dashboard_exprs(dashboard())]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_metric_names_reads_promql() -> None:
    expr = ('histogram_quantile(0.5, sum by (backend, le) (rate(rollout_request_duration_'
            'seconds_bucket{job=~"$job",code_class="5xx"}[$__rate_interval]))) > 1.2 * up '
            'and on (job) x offset 10m')
    assert metric_names(expr) == {"rollout_request_duration_seconds_bucket", "up", "x"}
