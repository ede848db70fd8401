"""Distinct users per backend per UTC day: sketches in process and in a real redis-server."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.state.users import ActiveUsers, RedisActiveUsers, ticket_rates
from tests.conftest import free_port
from tests.test_e2e_redis import Redis

NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (make test installs it)")


def close_to(estimate: float, truth: float, within: float = 0.02) -> bool:
    return abs(estimate - truth) <= within * truth


def split(users: ActiveUsers | RedisActiveUsers, first: int, last: int, now: datetime) -> None:
    """Users first..last-1: multiples of 3 on next_gen, the others on legacy."""
    for n in range(first, last):
        users.add("next_gen" if n % 3 == 0 else "legacy", f"user-{n}", now)


def test_ten_thousand_users_are_counted_within_two_percent() -> None:
    users = ActiveUsers(days=90)
    split(users, 0, 10_000, NOON)
    [day] = users.days()
    assert day["day"] == "2026-11-25"
    assert close_to(day["legacy"], 6_666) and close_to(day["next_gen"], 3_334)
    assert close_to(day["adoption"], 0.3334)
    assert users.today("legacy") == day["legacy"] and users.today("next_gen") == day["next_gen"]


def test_a_user_on_both_backends_counts_once_in_the_union() -> None:
    users = ActiveUsers(days=90)
    users.add("legacy", "alice", NOON)
    users.add("next_gen", "alice", NOON)
    assert users.days()[0]["adoption"] == 1.0
    many = ActiveUsers(days=90)
    for n in range(10_000):  # everyone on legacy, the first 4,000 on next_gen too
        many.add("legacy", f"user-{n}", NOON)
        if n < 4_000:
            many.add("next_gen", f"user-{n}", NOON)
    [day] = many.days()
    assert close_to(day["legacy"], 10_000) and close_to(day["next_gen"], 4_000)
    assert close_to(day["adoption"], 0.4)  # the sum would say 4,000 / 14,000 = 0.29


def test_all_on_next_gen_is_full_adoption_and_no_users_is_none() -> None:
    users = ActiveUsers(days=90)
    for n in range(5_000):
        users.add("next_gen", f"user-{n}", NOON)
    assert users.days()[0]["adoption"] == 1.0
    users.add("legacy", "", NOON + timedelta(days=1))  # anonymous: not a user
    assert [day["day"] for day in users.days()] == ["2026-11-25"]
    assert ActiveUsers(days=90).days() == []


def test_days_roll_over_at_utc_midnight() -> None:
    users = ActiveUsers(days=90)
    midnight = datetime(2026, 11, 26, tzinfo=UTC)
    users.add("legacy", "a", midnight - timedelta(microseconds=1))
    users.add("legacy", "b", midnight)
    users.add("legacy", "c", datetime(2026, 11, 26, 1, 30, tzinfo=timezone(timedelta(hours=2))))
    users.add("next_gen", "d", midnight + timedelta(hours=23, minutes=59))
    days = users.days()
    assert [(d["day"], d["legacy"], d["next_gen"]) for d in days] == [
        ("2026-11-26", 1, 1), ("2026-11-25", 2, 0)]
    assert days[0]["adoption"] == 0.5
    assert users.today("legacy") == 1 and users.today("next_gen") == 1


def test_a_late_answer_still_counts_on_its_own_day() -> None:
    users = ActiveUsers(days=90)
    users.add("legacy", "a", NOON)
    users.add("legacy", "b", NOON + timedelta(days=1))
    users.days()  # counts the day before as settled
    users.add("next_gen", "c", NOON)
    assert [(d["legacy"], d["next_gen"]) for d in users.days()] == [(1, 0), (1, 1)]


def test_only_the_newest_days_are_kept() -> None:
    users = ActiveUsers(days=3)
    for back in range(5, -1, -1):
        users.add("legacy", f"user-{back}", NOON - timedelta(days=back))
    assert [d["day"] for d in users.days()] == ["2026-11-25", "2026-11-24", "2026-11-23"]
    users.add("legacy", "too-late", NOON - timedelta(days=3))
    assert len(users.days()) == 3
    users.days()
    users.add("legacy", "too-late", NOON - timedelta(days=3))  # the cached day cannot hide it
    assert [d["day"] for d in users.days()][-1] == "2026-11-23"


async def test_refresh_drops_old_days_and_zeroes_today_after_midnight() -> None:
    users = ActiveUsers(days=2)
    users.add("legacy", "a", NOON - timedelta(days=1))
    users.add("legacy", "b", NOON)
    await users.refresh(NOON + timedelta(days=1))
    assert [d["day"] for d in users.days()] == ["2026-11-25"]
    assert users.today("legacy") == 0
    users.add("legacy", "c", NOON + timedelta(days=1))
    assert users.today("legacy") == 1


def test_json_round_trip_preserves_the_estimates() -> None:
    users = ActiveUsers(days=90)
    split(users, 0, 10_000, NOON)
    split(users, 0, 40, NOON - timedelta(days=1))  # small: the sketch is still a list
    document = json.loads(json.dumps(users.to_json()))
    assert set(document) == {"2026-11-24", "2026-11-25"}
    restored = ActiveUsers.from_json(document, days=90)
    assert restored.days() == users.days()
    assert restored.merge(document) == 0  # merging the same copy twice counts nobody twice
    for again, first in zip(restored.days(), users.days(), strict=True):
        assert close_to(again["legacy"], first["legacy"], 0.01)
        assert close_to(again["next_gen"], first["next_gen"], 0.01)


def test_merging_a_persisted_copy_unions_the_users() -> None:
    before, now = ActiveUsers(days=90), ActiveUsers(days=90)
    split(before, 0, 6_000, NOON)
    split(now, 4_000, 10_000, NOON)
    now.merge(before.to_json())
    [day] = now.days()
    assert close_to(day["legacy"], 6_666) and close_to(day["next_gen"], 3_334)
    now.add("next_gen", "after-the-merge", NOON)
    assert close_to(now.today("next_gen"), 3_335)


def test_unreadable_entries_are_skipped_and_counted() -> None:
    good = ActiveUsers(days=90)
    good.add("legacy", "a", NOON)
    document: dict[str, object] = {**good.to_json(), "2026-11-24": {"legacy": "not base64!"},
                                   "yesterday": {"legacy": good.to_json()["2026-11-25"]["legacy"]},
                                   "2026-11-23": ["legacy"], "2026-11-22": {"canary": "AAAA"}}
    users = ActiveUsers(days=90)
    assert users.merge(document) == 4
    assert users.merge(["not", "a", "mapping"]) == 0
    assert [(d["day"], d["legacy"]) for d in users.days()] == [("2026-11-25", 1)]


def test_a_hundred_thousand_users_in_a_day_are_counted_within_the_sketchs_error() -> None:
    """ActiveUsers.add runs per request: 100k distinct ids (its cost is `load/`'s to
    measure, never a test's) are counted as about 100k, and again ids add nothing."""
    users = ActiveUsers(days=90)
    ids = [f"user-{n}" for n in range(100_000)]
    for user in ids:
        users.add("legacy", user, NOON)
    assert close_to(users.today("legacy"), 100_000)
    for user in ids[:1000]:
        users.add("legacy", user, NOON)
    assert close_to(users.days()[0]["legacy"], 100_000)


def test_ticket_rates_divide_complaints_by_that_days_users() -> None:
    days = [{"day": "2026-11-25", "legacy": 800, "next_gen": 200, "adoption": 0.2},
            {"day": "2026-11-24", "legacy": 1000, "next_gen": 0, "adoption": 0.0}]
    at = datetime(2026, 11, 25, tzinfo=UTC).timestamp()
    complaints = ([(at + 60, "legacy")] * 4 + [(at + 3600, "next_gen")] * 2
                  + [(at - 1, "legacy"), (at - 1, "next_gen"), (at + 86_400, "next_gen")])
    assert ticket_rates(days, complaints) == [
        {"day": "2026-11-25", "complaints": {"legacy": 4, "next_gen": 2},
         "legacy": 0.005, "next_gen": 0.01, "baseline": 0.005, "ratio": 2.0},
        {"day": "2026-11-24", "complaints": {"legacy": 1, "next_gen": 1},
         "legacy": 0.001, "next_gen": None, "baseline": 0.001, "ratio": None}]
    quiet = ticket_rates(days[:1], [])[0]
    assert quiet["legacy"] == 0.0 and quiet["ratio"] is None


def test_ticket_rates_take_the_rows_of_days() -> None:
    users = ActiveUsers(days=90)
    users.add("legacy", "a", NOON)
    users.add("legacy", "b", NOON)
    [row] = ticket_rates(users.days(), [(NOON.timestamp(), "legacy")])
    assert row["legacy"] == 0.5 and row["next_gen"] is None


# Redis: the same sketches shared by replicas --------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def clients(redis_server: Redis) -> AsyncIterator[list[aioredis.Redis]]:
    made = [aioredis.from_url(redis_server.url) for _ in range(2)]
    yield made
    for client in made:
        await client.aclose()


@needs_redis
async def test_two_replicas_agree_on_the_union_within_two_percent(
        clients: list[aioredis.Redis]) -> None:
    one, two = (RedisActiveUsers(client, days=90) for client in clients)
    split(one, 0, 6_000, NOON)  # users 4,000..5,999 reach both replicas
    split(two, 4_000, 10_000, NOON)
    await one.flush()
    await two.flush()
    await one.refresh(NOON)
    await two.refresh(NOON)
    assert one.days() == two.days()
    [day] = one.days()
    assert day["day"] == "2026-11-25"
    assert close_to(day["legacy"], 6_666) and close_to(day["next_gen"], 3_334)
    assert close_to(day["adoption"], 0.3334)
    assert one.today("next_gen") == day["next_gen"] and one.dropped == two.dropped == 0
    ttl = await clients[0].ttl("rollout:users:2026-11-25:legacy")
    assert 90 * 86_400 < ttl <= 91 * 86_400


@needs_redis
async def test_redis_union_counts_a_user_on_both_backends_once(
        clients: list[aioredis.Redis]) -> None:
    one, two = (RedisActiveUsers(client, days=90) for client in clients)
    for n in range(10_000):
        one.add("legacy", f"user-{n}", NOON)
        if n < 4_000:
            two.add("next_gen", f"user-{n}", NOON)
    await one.flush()
    await two.flush()
    await two.refresh(NOON)
    [day] = two.days()
    assert close_to(day["legacy"], 10_000) and close_to(day["adoption"], 0.4)


@needs_redis
async def test_redis_days_roll_over_and_only_the_newest_are_kept(
        clients: list[aioredis.Redis]) -> None:
    users = RedisActiveUsers(clients[0], days=3)
    for back in range(5, -1, -1):
        users.add("legacy", f"user-{back}", NOON - timedelta(days=back))
    users.add("next_gen", "late", datetime(2026, 11, 26, tzinfo=UTC) - timedelta(microseconds=1))
    await users.flush()
    await users.refresh(NOON)
    assert [(d["day"], d["legacy"], d["next_gen"]) for d in users.days()] == [
        ("2026-11-25", 1, 1), ("2026-11-24", 1, 0), ("2026-11-23", 1, 0)]
    users.add("legacy", "on-the-next-day", datetime(2026, 11, 26, tzinfo=UTC))
    await users.flush()
    await users.refresh(datetime(2026, 11, 26, 0, 0, 1, tzinfo=UTC))
    assert [d["day"] for d in users.days()] == ["2026-11-26", "2026-11-25", "2026-11-24"]
    assert users.today("legacy") == 1 and users.today("next_gen") == 0


@needs_redis
async def test_redis_buffer_is_bounded_and_drops_are_counted(
        clients: list[aioredis.Redis]) -> None:
    users = RedisActiveUsers(clients[0], days=90, max_pending=10)
    for n in range(15):
        users.add("legacy", f"user-{n}", NOON)
    users.add("legacy", "user-0", NOON)  # already buffered: not a drop
    assert users.dropped == 5
    await users.flush()
    users.add("legacy", "user-20", NOON)  # the flush emptied the buffer
    await users.flush()
    await users.refresh(NOON)
    assert users.days()[0]["legacy"] == 11 and users.dropped == 5


async def test_redis_down_keeps_the_buffer_for_the_next_flush() -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    users = RedisActiveUsers(client, days=90, max_pending=3)
    try:
        users.add("legacy", "a", NOON)
        users.add("legacy", "b", NOON)
        await users.flush()
        assert not users.up
        users.add("legacy", "c", NOON)
        users.add("legacy", "d", NOON)
        await users.flush()
        await users.refresh(NOON)
        assert users.pending == {(NOON.date(), "legacy"): users.pending[(NOON.date(), "legacy")]}
        assert len(users.pending[(NOON.date(), "legacy")]) == 3 and users.dropped == 1
        assert users.days() == [] and users.today("legacy") == 0
    finally:
        await client.aclose()


@needs_redis
async def test_redis_counts_a_hundred_thousand_users_after_one_flush(
        clients: list[aioredis.Redis]) -> None:
    users = RedisActiveUsers(clients[0], days=90, max_pending=200_000)
    for n in range(100_000):
        users.add("legacy", f"user-{n}", NOON)
    await users.flush()
    await users.refresh(NOON)
    assert close_to(users.days()[0]["legacy"], 100_000)
