"""Retry policy for worker batches: bounded attempts, backoff with jitter, and a retry budget.

Only computing a batch on an expert replica is retried: it is idempotent (a duplicate delivery is
ignored by the gateway's combine, slot by slot), and only after codes that mean "this replica could
not" (UNAVAILABLE, CANCELLED, UNKNOWN, RESOURCE_EXHAUSTED). The budget caps retries at a fraction
of first attempts (plus a small floor), so when many replicas fail at once the router fails fast
instead of multiplying the load on what is left.
"""

from __future__ import annotations

import random
import time


class RetryBudget:
    """Token bucket: each first attempt earns `ratio` of a retry, up to `cap`; the floor refills
    `floor_per_s` retries per second whatever the traffic."""

    def __init__(self, ratio: float = 0.2, floor_per_s: float = 5.0, cap: float = 50.0) -> None:
        self.ratio, self.floor_per_s, self.cap = ratio, floor_per_s, cap
        self.tokens = cap
        self._refilled_at = time.monotonic()
        self.denied = 0

    def earn(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def spend(self, counted: bool = True) -> bool:
        """Take one retry (or hedge) from the budget; False when it is empty, counted in `denied` unless
        not `counted` (a refused hedge fails nothing: the batch still waits on its first replica)."""
        now = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (now - self._refilled_at) * self.floor_per_s)
        self._refilled_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.denied += counted
        return False


def backoff_s(attempt: int, rng: random.Random, base_s: float = 0.005, cap_s: float = 0.2) -> float:
    """Delay before retry number `attempt` (1-based): exponential, with +-50% jitter so retries of
    requests that failed together do not arrive together."""
    return min(cap_s, base_s * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.5)
