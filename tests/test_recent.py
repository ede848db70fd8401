"""The memory of which backend served recent requests (complaints by request id)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.state.recent import Recent


def test_remembers_the_newest_and_forgets_the_oldest_first() -> None:
    recent = Recent(3)
    for rid, backend in (("a", "legacy"), ("b", "next_gen"), ("c", "legacy"), ("d", "next_gen")):
        recent.remember(rid, backend)
    assert recent.get("a") is None
    assert [recent.get(r) for r in "bcd"] == ["next_gen", "legacy", "next_gen"]
    assert len(recent) == 3


def test_an_id_remembered_again_outlives_its_first_slot() -> None:
    recent = Recent(3)
    recent.remember("a", "legacy")
    recent.remember("b", "legacy")
    recent.remember("a", "next_gen")  # a client reusing its X-Request-Id
    recent.remember("c", "legacy")  # overwrites a's first slot
    assert recent.get("a") == "next_gen"


@given(st.lists(st.tuples(st.text(max_size=8), st.sampled_from(["legacy", "next_gen"])),
                max_size=60), st.integers(1, 10))
def test_matches_the_last_size_requests(seen: list[tuple[str, str]], size: int) -> None:
    recent = Recent(size)
    for rid, backend in seen:
        recent.remember(rid, backend)
    window = dict(seen[-size:])  # the newest `size` requests: each id's latest backend
    for rid, _ in seen:
        assert recent.get(rid) == window.get(rid)
    assert len(recent) == len(window) <= size
