"""Where a request goes: buckets and decide(), pure, no sockets."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.model import RoutingConfig, UserIdSource
from proxy.datapath.decide import Decision, Facts, Plan, bucket, decide, user_id
from tests.conftest import ROOT

SALT = "next-gen-2024"
ALL_SOURCES = (UserIdSource("header", "X-User-Id"), UserIdSource("cookie", "user_id"),
               UserIdSource("query", "user_id"), UserIdSource("json", "user_id"))
MIRRORING_PHASES = ("shadow", "opt_in", "progressive")
VENV_PYTHON = str(ROOT / ".venv" / "bin" / "python")


def routing(*, anonymous: str = "legacy", paths: tuple[str, ...] = ("/",),
            sources: tuple[UserIdSource, ...] = ALL_SOURCES) -> RoutingConfig:
    return RoutingConfig(user_id=sources, opt_header="X-Next-Gen", anonymous=anonymous,
                         paths=paths)


def facts(*, user: str | None = None, opt: str | None = None, path: str = "/v1/tasks",
          headers: Mapping[str, str] | None = None, cookies: Mapping[str, str] | None = None,
          query: Mapping[str, str] | None = None,
          json_body: Mapping[str, Any] | None = None) -> Facts:
    """Facts as the server gathers them: headers in a case-insensitive multidict."""
    raw = CIMultiDict(headers or {})
    if user is not None:
        raw["X-User-Id"] = user
    if opt is not None:
        raw["X-Next-Gen"] = opt
    return Facts("POST", path, CIMultiDictProxy(raw), cookies or {}, query or {}, json_body)


def plan(phase: str, percentage: float = 0, sample: float = 1.0, salt: str = SALT) -> Plan:
    return Plan(phase=phase, percentage=percentage, salt=salt, sample=sample)


def always(value: float) -> Callable[[], float]:
    return lambda: value


def never_drawn() -> float:
    raise AssertionError("chance() was drawn where the decision must not be random")


def user_in(low: int, high: int, salt: str = SALT) -> str:
    """A user id whose bucket lies in [low, high)."""
    return next(f"user-{i}" for i in range(100_000) if low <= bucket(salt, f"user-{i}") < high)


def route(f: Facts, p: Plan, *, chance: Callable[[], float] | None = None,
          config: RoutingConfig | None = None) -> Decision:
    return decide(f, config or routing(), p, chance or always(0.5))


# The bucket formula --------------------------------------------------------------------------


@settings(max_examples=200)
@given(salt=st.text(max_size=40), uid=st.text(min_size=1, max_size=60))
def test_bucket_is_mmh3_of_salt_colon_user_unsigned_mod_10000(salt: str, uid: str) -> None:
    assert bucket(salt, uid) == mmh3.hash(salt + ":" + uid, signed=False) % 10000


def test_bucket_values_are_pinned_so_a_library_change_cannot_move_users() -> None:
    # Computed once from the formula; a user must never change cohort between releases.
    assert bucket(SALT, "alice") == 4749
    assert bucket(SALT, "bob") == 7007
    assert bucket("test", "user-1") == mmh3.hash("test:user-1", signed=False) % 10000


def test_buckets_are_the_same_in_a_fresh_process_whatever_its_hash_seed() -> None:
    ids = [f"user-{i}" for i in range(200)] + ["ålice", "用户", ""]
    script = ("import json, sys; from proxy.datapath.decide import bucket; "
              "print(json.dumps([bucket(sys.argv[1], u) for u in json.loads(sys.argv[2])]))")
    here = [bucket(SALT, uid) for uid in ids]

    for seed in ("1", "4242"):
        out = subprocess.run([VENV_PYTHON, "-c", script, SALT, json.dumps(ids)], cwd=ROOT,
                             env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                             text=True, timeout=30, check=True)
        assert json.loads(out.stdout) == here


@settings(max_examples=200)
@given(uid=st.text(min_size=1, max_size=40), salt=st.text(max_size=20),
       low=st.floats(0, 100), high=st.floats(0, 100))
def test_user_on_next_gen_stays_there_when_the_percentage_rises(
        uid: str, salt: str, low: float, high: float) -> None:
    low, high = sorted((low, high))
    before = route(facts(user=uid), plan("progressive", low, salt=salt))
    after = route(facts(user=uid), plan("progressive", high, salt=salt))

    if before.primary == "next_gen":
        assert after.primary == "next_gen"


IDS = [f"customer-{i:06d}" for i in range(20_000)]


@settings(max_examples=15, deadline=None)
@given(percentage=st.floats(0, 100), salt=st.text(min_size=1, max_size=12))
def test_share_on_next_gen_is_within_1_5_points_of_the_percentage(percentage: float,
                                                                   salt: str) -> None:
    served = sum(route(facts(user=uid), plan("progressive", percentage, sample=0, salt=salt),
                       chance=never_drawn).primary == "next_gen" for uid in IDS)

    assert abs(100 * served / len(IDS) - percentage) <= 1.5


def test_a_new_salt_reshuffles_users() -> None:
    ids = IDS[:5000]
    old = [bucket("spring", uid) for uid in ids]
    new = [bucket("autumn", uid) for uid in ids]
    on_old = [b < 5000 for b in old]
    on_new = [b < 5000 for b in new]

    moved_bucket = sum(a != b for a, b in zip(old, new, strict=True)) / len(ids)
    switched = sum(a != b for a, b in zip(on_old, on_new, strict=True)) / len(ids)
    assert moved_bucket > 0.99
    # At 50 %, an independent reshuffle moves about half the users across.
    assert 0.4 < switched < 0.6


@pytest.mark.parametrize("percentage", [0.07, 0.55, 1.1, 4.15])
def test_decimal_percentage_admits_exactly_that_many_buckets(percentage: float) -> None:
    from proxy.datapath.decide import on_next_gen

    admitted = sum(on_next_gen(b, percentage) for b in range(10_000))

    assert admitted == round(percentage * 100)


@pytest.mark.parametrize(("percentage", "admitted"), [(0, 0), (0.5, 50), (10, 1000),
                                                      (25, 2500), (100, 10_000)])
def test_percentage_admits_that_many_basis_points(percentage: float, admitted: int) -> None:
    from proxy.datapath.decide import on_next_gen

    assert sum(on_next_gen(b, percentage) for b in range(10_000)) == admitted


# The six phases ------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [None, "1", "0"])
def test_legacy_phase_sends_everybody_to_legacy_unmirrored(opt: str | None) -> None:
    decision = route(facts(user=user_in(0, 100), opt=opt), plan("legacy", 100),
                     chance=never_drawn)

    assert (decision.primary, decision.mirror, decision.fallback) == ("legacy", False, False)


def test_shadow_phase_serves_legacy_and_mirrors_the_sample() -> None:
    mirrored = route(facts(user="alice"), plan("shadow", 100, sample=0.25), chance=always(0.2))
    kept = route(facts(user="alice"), plan("shadow", 100, sample=0.25), chance=always(0.3))

    assert (mirrored.primary, mirrored.mirror) == ("legacy", True)
    assert (kept.primary, kept.mirror) == ("legacy", False)


def test_shadow_phase_ignores_the_opt_in_header() -> None:
    decision = route(facts(user="alice", opt="1"), plan("shadow", 100))

    assert (decision.primary, decision.mirror) == ("legacy", True)


def test_opt_in_phase_serves_opted_in_users_from_next_gen_with_fallback() -> None:
    decision = route(facts(user="alice", opt="yes"), plan("opt_in", 0))

    assert (decision.primary, decision.mirror, decision.fallback) == ("next_gen", False, True)


def test_opt_in_phase_keeps_everyone_else_on_legacy_and_mirrors_them() -> None:
    low_bucket = user_in(0, 100)

    decision = route(facts(user=low_bucket), plan("opt_in", 100, sample=1.0))
    anonymous = route(facts(), plan("opt_in", 100, sample=1.0))

    assert (decision.primary, decision.mirror) == ("legacy", True)
    assert (anonymous.primary, anonymous.mirror) == ("legacy", True)


def test_opt_in_phase_mirrors_only_the_sample_of_the_rest() -> None:
    assert route(facts(user="alice"), plan("opt_in", 0, sample=0.1),
                 chance=always(0.05)).mirror is True
    assert route(facts(user="alice"), plan("opt_in", 0, sample=0.1),
                 chance=always(0.5)).mirror is False


def test_progressive_phase_serves_users_under_the_percentage_from_next_gen() -> None:
    uid = user_in(0, 2500)

    decision = route(facts(user=uid), plan("progressive", 25))

    assert (decision.primary, decision.mirror, decision.fallback) == ("next_gen", False, True)
    assert decision.bucket == bucket(SALT, uid)


def test_progressive_phase_keeps_users_over_the_percentage_on_legacy_mirrored() -> None:
    uid = user_in(2500, 10_000)

    decision = route(facts(user=uid), plan("progressive", 25, sample=1.0))

    assert (decision.primary, decision.mirror) == ("legacy", True)
    assert decision.bucket == bucket(SALT, uid)


def test_progressive_phase_serves_opted_in_users_at_any_percentage() -> None:
    decision = route(facts(user=user_in(9000, 10_000), opt="true"), plan("progressive", 0))

    assert (decision.primary, decision.fallback) == ("next_gen", True)


def test_progressive_phase_keeps_opted_out_users_on_legacy_at_100_percent() -> None:
    decision = route(facts(user=user_in(0, 100), opt="no"), plan("progressive", 100))

    assert decision.primary == "legacy"


@pytest.mark.parametrize("who", [{"user": "alice"}, {"user": "bob"}, {}])
def test_default_phase_serves_everybody_from_next_gen_unmirrored(who: dict[str, str]) -> None:
    decision = route(facts(**who), plan("default", 0), chance=never_drawn)

    assert (decision.primary, decision.mirror, decision.deprecated) == ("next_gen", False, False)


def test_default_phase_keeps_opted_out_users_on_legacy_marked_deprecated() -> None:
    decision = route(facts(user="alice", opt="0"), plan("default", 0), chance=never_drawn)

    assert (decision.primary, decision.mirror, decision.deprecated) == ("legacy", False, True)
    assert decision.gone is False


@pytest.mark.parametrize("who", [{"user": "alice"}, {"user": "alice", "opt": "1"}, {}])
def test_sunset_phase_serves_everybody_from_next_gen_without_fallback(
        who: dict[str, str]) -> None:
    decision = route(facts(**who), plan("sunset", 0), chance=never_drawn)

    assert (decision.primary, decision.mirror, decision.fallback) == ("next_gen", False, False)
    assert decision.gone is False


def test_sunset_phase_answers_opted_out_users_gone_without_fallback() -> None:
    decision = route(facts(user="alice", opt="false"), plan("sunset", 0), chance=never_drawn)

    assert decision.gone is True
    assert (decision.mirror, decision.fallback) == (False, False)


# The opt header ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "yes", "TRUE", "Yes", " yes "])
def test_opt_in_values_are_honoured_case_insensitively(value: str) -> None:
    decision = route(facts(user=user_in(9000, 10_000), opt=value), plan("progressive", 0))

    assert decision.primary == "next_gen"


@pytest.mark.parametrize("value", ["0", "false", "no", "FALSE", "No"])
def test_opt_out_values_are_honoured_case_insensitively(value: str) -> None:
    decision = route(facts(user=user_in(0, 100), opt=value), plan("progressive", 100))

    assert decision.primary == "legacy"


@pytest.mark.parametrize("value", ["maybe", "", "2", "on"])
def test_other_opt_values_are_ignored(value: str) -> None:
    uid = user_in(0, 100)

    decision = route(facts(user=uid, opt=value), plan("progressive", 10))

    assert (decision.primary, decision.bucket) == ("next_gen", bucket(SALT, uid))


def test_opt_header_name_is_matched_case_insensitively() -> None:
    decision = route(facts(user=user_in(9000, 10_000), headers={"x-next-gen": "1"}),
                     plan("progressive", 0))

    assert decision.primary == "next_gen"


# User-id sources -----------------------------------------------------------------------------


def test_user_id_comes_from_the_first_source_that_has_one() -> None:
    everything = dict(headers={"X-User-Id": "h"}, cookies={"user_id": "c"},
                      query={"user_id": "q"}, json_body={"user_id": "j"})
    config = routing()

    assert user_id(facts(**everything), config) == "h"
    assert user_id(facts(**{**everything, "headers": {}}), config) == "c"
    assert user_id(facts(**{**everything, "headers": {}, "cookies": {}}), config) == "q"
    assert user_id(facts(json_body={"user_id": "j"}), config) == "j"
    assert user_id(facts(), config) is None


def test_empty_source_value_falls_through_to_the_next_source() -> None:
    f = facts(headers={"X-User-Id": ""}, cookies={"user_id": "c"})

    assert user_id(f, routing()) == "c"


def test_source_order_follows_the_config_not_a_fixed_order() -> None:
    config = routing(sources=(UserIdSource("query", "uid"), UserIdSource("header", "X-User-Id")))
    f = facts(user="from-header", query={"uid": "from-query"})

    assert user_id(f, config) == "from-query"


def test_json_field_is_read_only_when_configured() -> None:
    f = facts(json_body={"user_id": "j"})

    assert user_id(f, routing(sources=(UserIdSource("header", "X-User-Id"),))) is None


def test_numeric_json_user_id_is_a_user_id() -> None:
    assert user_id(facts(json_body={"user_id": 42}), routing()) == "42"


@pytest.mark.parametrize("value", [{"id": 1}, [1], None, 1.5, True])
def test_non_scalar_json_user_id_is_ignored(value: Any) -> None:
    assert user_id(facts(json_body={"user_id": value}), routing()) is None


def test_false_json_user_id_is_ignored() -> None:
    assert user_id(facts(json_body={"user_id": False}), routing()) is None


def test_the_bucket_follows_the_user_id_source() -> None:
    decision = route(facts(cookies={"user_id": "carol"}), plan("progressive", 50))

    assert decision.bucket == bucket(SALT, "carol")


# Anonymous requests --------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["opt_in", "progressive"])
def test_anonymous_request_goes_to_legacy_by_default(phase: str) -> None:
    decision = route(facts(), plan(phase, 100, sample=1.0), chance=always(0.0))

    assert (decision.primary, decision.mirror) == ("legacy", True)


@pytest.mark.parametrize("phase", ["opt_in", "progressive"])
def test_anonymous_random_draws_next_gen_with_the_percentage(phase: str) -> None:
    config = routing(anonymous="random")

    drawn = route(facts(), plan(phase, 30), chance=always(0.29), config=config)
    not_drawn = route(facts(), plan(phase, 30), chance=always(0.31), config=config)

    assert (drawn.primary, drawn.fallback) == ("next_gen", True)
    assert not_drawn.primary == "legacy"


@pytest.mark.parametrize("phase", ["default", "sunset"])
def test_anonymous_request_goes_to_next_gen_in_default_and_sunset(phase: str) -> None:
    decision = route(facts(), plan(phase, 0), chance=never_drawn)

    assert decision.primary == "next_gen"


# Paths and sampling --------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["shadow", "opt_in", "progressive", "default", "sunset"])
def test_path_outside_routing_paths_goes_to_legacy_unmirrored(phase: str) -> None:
    config = routing(paths=("/v1/",))

    decision = route(facts(user="alice", opt="1", path="/health"), plan(phase, 100),
                     chance=never_drawn, config=config)

    assert (decision.primary, decision.mirror, decision.gone) == ("legacy", False, False)


def test_path_under_a_configured_prefix_is_routed() -> None:
    decision = route(facts(user="alice", path="/v1/tasks"), plan("default", 0),
                     config=routing(paths=("/v1/",)))

    assert decision.primary == "next_gen"


@settings(max_examples=200)
@given(phase=st.sampled_from(MIRRORING_PHASES), uid=st.one_of(st.none(), st.text(max_size=20)),
       percentage=st.floats(0, 100), draw=st.floats(0, 1, exclude_max=True))
def test_sample_zero_never_mirrors(phase: str, uid: str | None, percentage: float,
                                   draw: float) -> None:
    decision = route(facts(user=uid), plan(phase, percentage, sample=0.0),
                     chance=always(draw), config=routing(anonymous="random"))

    assert decision.mirror is False


@settings(max_examples=200)
@given(phase=st.sampled_from(("legacy", "shadow", "opt_in", "progressive", "default",
                              "sunset")),
       uid=st.one_of(st.none(), st.text(max_size=20)), opt=st.sampled_from([None, "1", "0"]),
       percentage=st.floats(0, 100), draw=st.floats(0, 1, exclude_max=True))
def test_only_legacy_served_requests_are_ever_mirrored(phase: str, uid: str | None,
                                                       opt: str | None, percentage: float,
                                                       draw: float) -> None:
    decision = route(facts(user=uid, opt=opt), plan(phase, percentage, sample=1.0),
                     chance=always(draw), config=routing(anonymous="random"))

    if decision.mirror:
        assert decision.primary == "legacy"
        assert phase in MIRRORING_PHASES
