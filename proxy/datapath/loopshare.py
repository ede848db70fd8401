"""How much of the event loop's time mirrors may take: `shadow.max_loop_share` (pure).

Rules:
1. A mirror's answer is read as fast as next_gen writes it; nothing else slows it down (the
   client is not waiting on it). So a next_gen that writes in small pieces, or without end,
   would take the loop from the clients. What mirrors spend reading is charged here, in
   seconds of the loop's time (what the read's Python took, plus READ_S for the loop's own
   part, which cannot be timed from Python), and their credit grows by `share` seconds per
   second, up to BURST_S.
2. While the credit is spent, a new mirror is refused (counted as "overload"); a mirror
   whose read takes it past -BURST_S is cut (its connection closed, counted as "overload",
   never recorded as next_gen's error or compared). So mirrors take at most `share` of the
   loop on average, and at most about 2 x BURST_S more in any stretch.
3. The share binds only while clients wait (`clients.in_flight`: a client request is in
   flight); with none, mirrors may use the loop freely and nothing is charged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

BURST_S = 0.01  # credit saved while mirrors are idle, and the debt that cuts a mirror
# The loop's own part of one read: uvloop's (epoll, recv, the bytes, the call) is some 5 us
# of CPU on the bench machine (1 KiB pieces on a socket pair); the kernel's TCP receive on
# the proxy's core about doubles it (`--scenario hostile`: some 25k reads a second took
# 0.4-0.6 s of the loop, of which Python was 0.15 s).
READ_S = 15e-6
CONNECT_S = 50e-6  # a new connection: connect, its epoll registration, and its close


class Clients(Protocol):
    """Who the share makes room for (rule 3): the runtime, counting client requests."""

    in_flight: int


class Waiting:
    """Clients always waiting: the share always binds (what a LoopShare starts with)."""

    in_flight = 1


class LoopShare:
    __slots__ = ("clients", "clock", "credit", "last", "share")

    def __init__(self, share: float, clock: Callable[[], float] = time.perf_counter,
                 clients: Clients | None = None) -> None:
        self.share, self.clock = share, clock
        self.clients: Clients = clients or Waiting()  # rule 3; build() gives the runtime
        self.credit = BURST_S
        self.last = clock()

    # The refill (credit grows by `share` per second since `last`, up to BURST_S) is written
    # out in each method: they run on every read of every mirror's answer.

    def spend(self, seconds: float) -> bool:
        """Charge one read whose Python took `seconds`; False when the mirror that made it
        must be cut."""
        if not self.clients.in_flight:
            return True
        now = self.clock()
        credit = self.credit + (now - self.last) * self.share
        self.last = now
        self.credit = credit = (BURST_S if credit > BURST_S else credit) - seconds - READ_S
        return credit > -BURST_S or self.share >= 1.0

    def charge(self, seconds: float) -> bool:
        """Charge work on a mirror's answer done outside a read (a mirror task measuring
        what it was handed); False when that mirror must be cut."""
        return self.spend(seconds - READ_S)

    def connected(self) -> None:
        """Charge a connection made for a mirror (each endless head or reset costs one)."""
        self.spend(CONNECT_S - READ_S)  # nothing, with no client waiting (rule 3)

    @property
    def spent(self) -> bool:
        """Whether a new mirror must wait for credit (it is refused, not queued)."""
        now = self.clock()
        credit = self.credit + (now - self.last) * self.share
        self.last = now
        self.credit = credit = BURST_S if credit > BURST_S else credit
        return credit <= 0.0 and self.share < 1.0 and self.clients.in_flight > 0
