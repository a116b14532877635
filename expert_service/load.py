"""A worker's live load, published with its registry heartbeat and used by routers and the balancer."""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque


class LoadTracker:
    """In-flight and queued rows now; rows/s and median compute time over a sliding window.

    Compute threads record work while the event loop takes snapshots (Describe, heartbeats), so every
    access holds one lock: iterating the window while a thread appends to it would raise.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.inflight_rows = 0
        self.queued_rows = 0
        self._computed: deque[tuple[float, int, float]] = deque()  # (finished at, rows, compute ms)
        self._lock = threading.Lock()

    def received(self, rows: int) -> None:
        with self._lock:
            self.inflight_rows += rows
            self.queued_rows += rows

    def started(self, rows: int) -> None:
        with self._lock:
            self.queued_rows -= rows

    def computed(self, rows: int, compute_ms: float) -> None:
        with self._lock:
            self._computed.append((time.monotonic(), rows, compute_ms))

    def finished(self, rows: int) -> None:
        with self._lock:
            self.inflight_rows -= rows

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            horizon = time.monotonic() - self.window_s
            while self._computed and self._computed[0][0] < horizon:
                self._computed.popleft()
            window = list(self._computed)
            inflight, queued = self.inflight_rows, self.queued_rows
        return {
            "inflight_rows": inflight,
            "queued_rows": queued,
            "rows_per_s": sum(rows for _, rows, _ in window) / self.window_s,
            "compute_p50_ms": statistics.median(ms for _, _, ms in window) if window else 0.0,
        }
