"""Autoscaling: how many expert workers to have, from their queued rows and throughput."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_serve.worker_record import WorkerRecord


@dataclass
class AutoscalePolicy:
    """Asks for one more worker when queued rows per replica stay above `target_queued_rows` for
    `window` consecutive checks, and one fewer after `window` idle checks, within [minimum, maximum]."""

    target_queued_rows: float
    window: int
    minimum: int
    maximum: int
    _busy: int = 0
    _idle: int = 0

    def decide(self, workers: int, queued_rows_per_replica: float, rows_per_s: float) -> int:
        """The worker count to have now (the current one when nothing should change)."""
        busy = queued_rows_per_replica > self.target_queued_rows
        idle = queued_rows_per_replica == 0 and rows_per_s == 0
        self._busy = self._busy + 1 if busy else 0
        self._idle = self._idle + 1 if idle else 0
        if self._busy >= self.window and workers < self.maximum:
            self._busy = 0
            return workers + 1
        if self._idle >= self.window and workers > self.minimum:
            self._idle = 0
            return workers - 1
        return workers


@dataclass(frozen=True)
class AutoscaleDecision:
    current: int  # workers registered now
    wanted: int  # workers to have (== current: no change)
    queued_rows_per_replica: float


def decide_worker_count(policy: AutoscalePolicy, records: Sequence[WorkerRecord]) -> AutoscaleDecision | None:
    """One autoscaling check over the managed workers' registry records; None when there are none."""
    if not records:
        return None
    queued = sum(r.load.get("queued_rows", 0) for r in records) / len(records)
    rate = sum(r.load.get("rows_per_s", 0) for r in records)
    return AutoscaleDecision(len(records), policy.decide(len(records), queued, rate), queued)
