"""Sliding-hour spend caps for mirroring, counted from what next_gen reported.

Rule: a mirror is refused while the last hour's spend (tokens or USD) is at or over its cap;
spend is counted when a mirror's answer is measured, so the cap can be overshot by the
mirrors already in flight (at most shadow.max_in_flight of them), never by more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

HOUR_S = 3600.0


class SpendBudget:
    def __init__(self, tokens_per_hour: float | None, usd_per_hour: float | None,
                 monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self.spends: deque[tuple[float, float, float]] = deque()  # (time, tokens, usd)
        self.tokens = 0.0
        self.usd = 0.0
        self.cap(tokens_per_hour, usd_per_hour)

    def cap(self, tokens_per_hour: float | None, usd_per_hour: float | None) -> None:
        """Set the caps (again, on a reload); what was spent in the last hour still counts."""
        self.tokens_cap, self.usd_cap = tokens_per_hour, usd_per_hour

    @property
    def capped(self) -> bool:
        return self.tokens_cap is not None or self.usd_cap is not None

    def _prune(self) -> None:
        edge = self.monotonic() - HOUR_S
        while self.spends and self.spends[0][0] <= edge:
            _, tokens, usd = self.spends.popleft()
            self.tokens -= tokens
            self.usd -= usd

    def allow(self) -> bool:
        if not self.capped:
            return True
        self._prune()
        if self.tokens_cap is not None and self.tokens >= self.tokens_cap:
            return False
        return not (self.usd_cap is not None and self.usd >= self.usd_cap)

    def spend(self, tokens: float | None, usd: float | None) -> None:
        if not self.capped or not (tokens or usd):
            return
        self.spends.append((self.monotonic(), tokens or 0.0, usd or 0.0))
        self.tokens += tokens or 0.0
        self.usd += usd or 0.0

    def status(self) -> dict[str, float | None]:
        self._prune()
        return {
            "tokens_per_hour": self.tokens_cap, "tokens_used": round(self.tokens, 3),
            "tokens_left": None if self.tokens_cap is None
            else round(max(0.0, self.tokens_cap - self.tokens), 3),
            "usd_per_hour": self.usd_cap, "usd_used": round(self.usd, 6),
            "usd_left": None if self.usd_cap is None
            else round(max(0.0, self.usd_cap - self.usd), 6),
        }
