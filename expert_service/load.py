"""A worker's live load, published with its registry heartbeat and used by routers and the balancer."""

from __future__ import annotations

import statistics
import time
from collections import deque


class LoadTracker:
    """In-flight and queued rows now; rows/s and median compute time over a sliding window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.inflight_rows = 0
        self.queued_rows = 0
        self._computed: deque[tuple[float, int, float]] = deque()  # (finished at, rows, compute ms)

    def received(self, rows: int) -> None:
        self.inflight_rows += rows
        self.queued_rows += rows

    def started(self, rows: int) -> None:
        self.queued_rows -= rows

    def computed(self, rows: int, compute_ms: float) -> None:
        self._computed.append((time.monotonic(), rows, compute_ms))

    def finished(self, rows: int) -> None:
        self.inflight_rows -= rows

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        while self._computed and self._computed[0][0] < now - self.window_s:
            self._computed.popleft()
        rows = sum(count for _, count, _ in self._computed)
        return {
            "inflight_rows": self.inflight_rows,
            "queued_rows": self.queued_rows,
            "rows_per_s": rows / self.window_s,
            "compute_p50_ms": statistics.median(ms for _, _, ms in self._computed) if self._computed else 0.0,
        }
