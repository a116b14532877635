"""The worker's load tracker is written by compute threads while the event loop reads it."""

from __future__ import annotations

import threading

from expert_service.load import LoadTracker


def test_snapshots_while_compute_threads_record() -> None:
    tracker = LoadTracker(window_s=60.0)
    for _ in range(2000):  # a long window makes every snapshot iterate while threads append
        tracker.computed(1, 1.0)
    per_thread = 10_000

    def compute() -> None:
        for _ in range(per_thread):
            tracker.received(2)
            tracker.started(2)
            tracker.computed(2, 1.0)
            tracker.finished(2)

    threads = [threading.Thread(target=compute) for _ in range(2)]
    for thread in threads:
        thread.start()
    snapshots = 0
    while any(thread.is_alive() for thread in threads) or snapshots == 0:
        snapshot = tracker.snapshot()  # raised "deque mutated during iteration" before the lock
        assert snapshot["compute_p50_ms"] == 1.0
        snapshots += 1
    for thread in threads:
        thread.join()
    final = tracker.snapshot()
    assert final["inflight_rows"] == 0 and final["queued_rows"] == 0  # no lost += under contention
    assert final["rows_per_s"] == (2000 + 2 * per_thread * 2) / 60.0
