"""What mirrors may take from the proxy: a share of its event loop (shadow.max_loop_share,
proxy/datapath/loopshare.py) and the bytes their measurements keep (shadow.max_held_bytes,
which the mirrors' Tees draw on as they read)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.datapath.loopshare import BURST_S, CONNECT_S, READ_S, LoopShare
from proxy.telemetry.events import EventStream
from proxy.telemetry.observe import Tee


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_mirrors_reading_without_pause_are_cut_once_they_owe_a_burst() -> None:
    clock = Clock()
    share = LoopShare(0.25, clock)
    reads = 0
    while share.spend(0.001):  # a read that took 1 ms, back to back with no time passing
        reads += 1
    # BURST_S of credit, then BURST_S of debt: the read that goes past it is cut
    assert reads == int(2 * BURST_S / (0.001 + READ_S))
    assert share.spent  # and new mirrors are refused meanwhile


def test_credit_comes_back_at_the_share_and_lets_mirrors_in_again() -> None:
    clock = Clock()
    share = LoopShare(0.25, clock)
    share.spend(BURST_S + 0.004)  # 4 ms in debt
    assert share.spent
    clock.now += 0.004 / 0.25 - 0.001  # not quite paid back
    assert share.spent
    clock.now += 0.002
    assert not share.spent
    clock.now += 3600  # idle for an hour: the credit saved is one burst, never more
    assert share.spend(0.0)
    assert share.credit == BURST_S - READ_S


def test_a_new_connection_is_charged_to_the_mirrors() -> None:
    share = LoopShare(0.25, Clock())
    for _ in range(int(BURST_S / CONNECT_S) + 1):
        share.connected()
    assert share.spent


@given(st.lists(st.floats(min_value=0, max_value=0.1), max_size=50))
def test_a_share_of_one_never_cuts_nor_refuses(costs: list[float]) -> None:
    share = LoopShare(1.0, Clock())
    assert all(share.spend(cost) for cost in costs)
    assert not share.spent


class Allowance:
    def __init__(self, cap: int) -> None:
        self.cap, self.level, self.peak = cap, 0, 0

    def take(self, size: int) -> bool:
        if self.level + size > self.cap:
            return False
        self.level += size
        self.peak = max(self.peak, self.level)
        return True

    def give(self, size: int) -> None:
        self.level -= size


def test_tees_reading_json_share_the_allowance_and_give_it_back() -> None:
    allowance = Allowance(1000)
    first, second = (Tee(True, 10_000, allowance=allowance) for _ in range(2))
    first.feed(b'{"a": "' + b"x" * 600)
    second.feed(b'{"b": "' + b"y" * 600)  # would hold 1,214 bytes in all
    assert not first.starved and second.starved
    assert allowance.level == 607
    second.feed(b'"}')  # a starved Tee keeps nothing more
    assert allowance.level == 607 and second.json() is None
    first.feed(b'"}')
    assert first.json() == {"a": "x" * 600}
    first.release()
    assert allowance.level == 0


def test_an_event_streams_open_line_is_held_against_the_allowance() -> None:
    allowance = Allowance(4096)
    tee = Tee(True, 1 << 20, EventStream((("usage", "total_tokens"),)), allowance)
    for _ in range(3):
        tee.feed(b"x" * 1000)  # one line that has not ended
    assert allowance.level == 3000
    tee.feed(b"\n\n")  # the line ends (and is no event we keep): its bytes come back
    assert allowance.level == 0
    tee.feed(b'data: {"usage": {"total_tokens": 5}}\n\n')
    assert tee.json() == {"usage": {"total_tokens": 5}}
    long = Tee(True, 1 << 20, EventStream((("usage", "total_tokens"),)), allowance)
    for _ in range(5):
        long.feed(b"y" * 1000)
    assert long.starved and allowance.level == 0 and allowance.peak <= 4096
    long.feed(b'\n\ndata: {"usage": {"total_tokens": 5}}\n\n')
    assert long.json() is None  # not measured from its body once starved
