"""Which backend served each recent request: a fixed-size memory of request ids.

Rules: memory is bounded by `size` whatever the traffic; remembering is O(1) and allocates
no string. Ids are kept as their hash (a collision, one in 2**64 per pair, could attribute
a complaint to the wrong backend); the oldest is forgotten first.

Why not a dict of id strings: 100,000 ids took 24 MB (the strings and an OrderedDict's
links), a quarter of the proxy's memory, and a plain dict's oldest entry, found with
next(iter()), cost 70 us a request once full.
"""

from __future__ import annotations

from array import array


class Recent:
    __slots__ = ("backend", "next", "order", "size", "slots")

    def __init__(self, size: int) -> None:
        self.size = size
        self.order = array("q", bytes(8 * size))  # hashes in the order remembered; 0: free
        self.backend: list[str | None] = [None] * size  # per slot: who served it
        self.slots: dict[int, int] = {}  # hash -> its newest slot
        self.next = 0

    def remember(self, rid: str, backend: str) -> None:
        key, slot = hash(rid) or 1, self.next
        oldest = self.order[slot]
        if oldest and self.slots.get(oldest) == slot:  # not remembered again since
            del self.slots[oldest]
        self.order[slot], self.backend[slot] = key, backend
        self.slots[key] = slot
        self.next = (slot + 1) % self.size

    def get(self, rid: str) -> str | None:
        slot = self.slots.get(hash(rid) or 1)
        return None if slot is None else self.backend[slot]

    def __len__(self) -> int:
        return len(self.slots)
