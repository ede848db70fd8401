"""The comparison trace is written without building dicts: it must be byte for byte what
json would write, or readers of the trace (report, jq, the SPEC) see a different record."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from proxy.telemetry.compare import Comparison, verdict
from proxy.telemetry.observe import Measurement
from proxy.telemetry.record import (
    TraceRecord,
    json_value,
    match_fields,
    match_json,
    parse_line,
    side_fields,
    side_json,
)

COMPACT = json.JSONEncoder(separators=(",", ":"))
numbers = st.none() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
texts = st.text(max_size=20)

measurements = st.builds(
    Measurement, status=st.none() | st.integers(100, 599), time_ms=st.floats(0, 1e7),
    ttft_ms=st.none() | st.floats(0, 1e7), bytes=st.integers(0, 10**12),
    tokens=st.none() | st.floats(0, 1e9) | st.integers(0, 10**9).map(float),
    success=st.none() | st.booleans(), memory_mb=st.none() | st.floats(0, 1e6),
    error=st.none() | st.sampled_from(["timeout", "reset", "truncated"]),
    cost_usd=st.none() | st.floats(0, 1e4))
comparisons = st.builds(
    Comparison, result=st.sampled_from(["match", "mismatch", "error"]), status=st.booleans(),
    success=st.booleans(), shape=st.booleans(), diff=st.lists(texts, max_size=4).map(tuple),
    noise=st.lists(texts, max_size=4).map(tuple))


@given(numbers | texts | st.booleans())
def test_one_value_is_written_as_json_writes_it(value: object) -> None:
    assert json_value(value) == COMPACT.encode(value)


@given(measurements)
def test_a_measurement_is_written_as_json_writes_its_fields(seen: Measurement) -> None:
    assert side_json(seen) == COMPACT.encode(side_fields(seen))


@given(comparisons)
def test_a_comparison_is_written_as_json_writes_its_fields(comparison: Comparison) -> None:
    assert match_json(comparison) == COMPACT.encode(match_fields(comparison))


@given(measurements, measurements, comparisons, texts, texts)
def test_the_line_the_proxy_writes_is_the_record_report_reads(
        old: Measurement, new: Measurement, comparison: Comparison, rid: str,
        path: str) -> None:
    """One schema (proxy/telemetry/record.py): TraceRecord.line, read back by parse_line."""
    line = TraceRecord.line(rid, 1796515200.0, "POST", "/" + path, old, new,
                            comparison)
    record = parse_line(line.encode())
    assert isinstance(record, TraceRecord)
    assert (record.execution_id, record.method) == (rid, "POST")
    assert record.path == ("/" + path).split("?", 1)[0]
    failed = new.status is None or new.error is not None
    assert (record.result, record.kinds) == verdict(comparison.result, {
        "status": comparison.status, "success": comparison.success,
        "shape": comparison.shape}, failed)
    assert record.old.status == old.status and record.new.status == new.status
    if old.status is not None and math.isfinite(old.time_ms):
        assert record.old.time_ms == round(old.time_ms, 3)
