"""The comparison rules (SPEC "Comparison result"), pure: no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.telemetry.compare import MAX_DIFF, compare, shape_diff
from proxy.telemetry.compare import same_shape as quick_shape
from proxy.telemetry.observe import Measurement
from proxy.telemetry.record import match_fields

NOTHING: frozenset[str] = frozenset()
LEGACY_BODY = {"id": "a1", "success": True, "usage": {"total_tokens": 12000},
               "steps": [{"action": "click", "ms": 12.5}], "meta": {"created": 1}}


def answer(status: int | None = 200, success: bool | None = True,
           error: str | None = None) -> Measurement:
    if status is None:
        return Measurement(None, 1.0, None, 0, None, False, None, error or "connect_error")
    return Measurement(status, 10.0, 1.0, 100, 1200, success, None)


def test_same_shape_with_different_values_is_a_match() -> None:
    new_body = {"id": "zz", "success": True, "usage": {"total_tokens": 1},
                "steps": [{"action": "type", "ms": 3}], "meta": {"created": 99}}
    result = compare(answer(), LEGACY_BODY, answer(201), new_body, NOTHING)
    assert result.result == "match"
    assert (result.status, result.success, result.shape, result.diff) == (True, True, True, ())


def test_different_status_class_is_a_mismatch() -> None:
    result = compare(answer(200), LEGACY_BODY, answer(404, success=True), LEGACY_BODY, NOTHING)
    assert result.result == "mismatch"
    assert result.status is False
    assert result.shape is True


def test_next_gen_5xx_against_legacy_200_is_a_mismatch_not_an_error() -> None:
    result = compare(answer(200), LEGACY_BODY, answer(503, success=False), None, NOTHING)
    assert result.result == "mismatch"
    assert result.status is False
    assert result.success is False


def test_both_5xx_agree_on_status() -> None:
    body = {"error": "boom"}
    result = compare(answer(500, False), body, answer(502, False), body, NOTHING)
    assert result.result == "match"
    assert result.status is True


def test_different_success_is_a_mismatch() -> None:
    result = compare(answer(200, True), LEGACY_BODY, answer(200, False), LEGACY_BODY, NOTHING)
    assert result.result == "mismatch"
    assert (result.status, result.success, result.shape) == (True, False, True)


@pytest.mark.parametrize("kind", ["connect_error", "timeout", "reset", "truncated",
                                  "bad_response"])
def test_no_answer_from_next_gen_is_an_error(kind: str) -> None:
    result = compare(answer(200), LEGACY_BODY, answer(None, error=kind), None, NOTHING)
    assert result.result == "error"
    assert match_fields(result)["result"] == "error"


def test_no_answer_is_an_error_even_when_legacy_failed_too() -> None:
    result = compare(answer(None), None, answer(None, error="timeout"), None, NOTHING)
    assert result.result == "error"


def test_missing_and_extra_keys_are_named_with_their_paths() -> None:
    new_body = {"id": "a1", "success": True, "usage": {"prompt_tokens": 3},
                "steps": [{"action": "click", "ms": 1}], "meta": {"created": 1}, "extra": 1}
    result = compare(answer(), LEGACY_BODY, answer(), new_body, NOTHING)
    assert result.result == "mismatch"
    assert result.shape is False
    assert set(result.diff) == {"usage.total_tokens", "usage.prompt_tokens", "extra"}


@pytest.mark.parametrize(("old", "new", "same"), [
    (1, 2.5, True),            # int and float are both numbers
    (1, "1", False),
    (True, 1, False),          # a boolean is not a number
    (False, True, True),
    (None, None, True),
    (None, {}, False),
    ([], {}, False),
    ("x", ["x"], False),
    ({}, {}, True),
])
def test_value_types_are_compared(old: Any, new: Any, same: bool) -> None:
    assert (shape_diff({"v": old}, {"v": new}, "", NOTHING) == []) is same


def test_types_are_compared_recursively() -> None:
    old = {"a": {"b": {"c": 1, "d": [1]}}}
    new = {"a": {"b": {"c": "1", "d": [1]}}}
    assert shape_diff(old, new, "", NOTHING) == ["a.b.c"]


def test_array_items_are_compared_by_shape() -> None:
    old = {"steps": [{"action": "click", "ms": 1}]}
    new = {"steps": [{"action": "click", "ms": "1"}]}
    assert shape_diff(old, new, "", NOTHING) == ["steps[].ms"]
    assert shape_diff({"xs": [1, 2]}, {"xs": [3]}, "", NOTHING) == []


def test_top_level_type_difference_is_named_dollar() -> None:
    result = compare(answer(), LEGACY_BODY, answer(), None, NOTHING)  # next_gen not JSON
    assert result.result == "mismatch"
    assert result.diff == ("$",)


def test_two_non_json_answers_compare_on_outcome_only() -> None:
    assert compare(answer(), None, answer(), None, NOTHING).result == "match"


@pytest.mark.parametrize(("ignore", "new_body"), [
    ({"id"}, {**LEGACY_BODY, "id": 7}),
    ({"id"}, {key: value for key, value in LEGACY_BODY.items() if key != "id"}),
    ({"meta.created"}, {**LEGACY_BODY, "meta": {"created": "2024-01-01"}}),
    ({"meta"}, {**LEGACY_BODY, "meta": [1, 2, 3]}),
    ({"steps[].ms"}, {**LEGACY_BODY, "steps": [{"action": "click", "ms": None}]}),
    ({"steps[].ms"}, {**LEGACY_BODY, "steps": [{"action": "click"}]}),
])
def test_ignored_paths_are_left_out_of_the_shape(ignore: set[str], new_body: Any) -> None:
    assert compare(answer(), LEGACY_BODY, answer(), new_body, NOTHING).result == "mismatch"
    assert compare(answer(), LEGACY_BODY, answer(), new_body, frozenset(ignore)).result == "match"


def test_ignoring_one_path_still_compares_its_siblings() -> None:
    new_body = {**LEGACY_BODY, "id": 7, "meta": {"created": 1, "new": True}}
    result = compare(answer(), LEGACY_BODY, answer(), new_body, frozenset({"id"}))
    assert result.diff == ("meta.new",)


def test_diff_is_capped() -> None:
    old = {f"k{i}": 1 for i in range(MAX_DIFF * 3)}
    result = compare(answer(), old, answer(), {}, NOTHING)
    assert result.result == "mismatch"
    assert len(result.diff) == MAX_DIFF


def test_trace_fields_carry_every_verdict() -> None:
    fields = match_fields(compare(answer(), LEGACY_BODY, answer(200, False), LEGACY_BODY,
                                  NOTHING))
    assert {key: fields[key] for key in ("result", "status", "success", "shape", "diff")} == {
        "result": "mismatch", "status": True, "success": False, "shape": True, "diff": []}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20)


def same_shape(value: Any) -> Any:
    """Another document of the same shape: every leaf replaced by one of its own type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [same_shape(item) for item in value]
    if isinstance(value, dict):
        return {key: same_shape(item) for key, item in value.items()}
    return None


@given(json_values)
def test_a_document_matches_any_document_of_its_shape(document: Any) -> None:
    assert compare(answer(), document, answer(), same_shape(document), NOTHING).result == "match"


@given(json_values, st.text(min_size=1, max_size=4))
def test_an_added_key_is_always_a_mismatch(document: Any, key: str) -> None:
    if not isinstance(document, dict) or key in document:
        document = {}
    new_body = {**document, key: 1}
    result = compare(answer(), document, answer(), new_body, NOTHING)
    assert result.result == "mismatch"
    assert key in result.diff


paths = st.sampled_from(["", "a", "b", "a.b", "a[]", "b[]", "a.b.c", "$", "x"])


@given(json_values, json_values, st.frozensets(paths, max_size=3))
def test_the_quick_shape_check_agrees_with_the_full_diff(old: Any, new: Any,
                                                        ignore: frozenset[str]) -> None:
    """compare() asks the quick check first and builds the diff only when it fails."""
    assert quick_shape(old, new, "", ignore) is (shape_diff(old, new, "", ignore) == [])


@given(json_values, st.frozensets(paths, max_size=3))
def test_the_quick_shape_check_agrees_on_documents_of_one_shape(
        document: Any, ignore: frozenset[str]) -> None:
    other = same_shape(document)
    assert quick_shape(document, other, "", ignore) is (
        shape_diff(document, other, "", ignore) == [])
