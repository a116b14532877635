"""Stragglers: when a replica sits on a batch far longer than its recent calls took, the router hedges the
batch on another replica (router_service/fanout.py) and stops sending the slow one rows.

A call is overdue after

    max(FLOOR_S, MULTIPLE x max(p99 call time, rows x p99 time per row))

of the replica's recent calls (a call covers the compute and the delivery to the gateway). The per-row
term lets a large batch take the longer it legitimately needs; as the per-row p99 of small batches is
mostly their fixed cost, it errs long for large ones, never short. Until a replica has MIN_SAMPLES calls
the pooled calls of all replicas stand in; with none at all, nothing is overdue.

An overdue replica is a suspect: it gets no new rows until it answers a call, or for SUSPECT_S at most
(a replica that stopped answering altogether has no call left to answer: after SUSPECT_S one batch probes
it again, and is hedged in turn if it is still stuck).
"""

from __future__ import annotations

import math
import time
from collections import deque

FLOOR_S = 0.25  # below this a batch is never hedged: scheduling hiccups are not stragglers
MULTIPLE = 4.0
SUSPECT_S = 5.0
MIN_SAMPLES = 8
WINDOW = 128  # recent calls per replica (the p99 of 128 is the second slowest)
REFRESH_EVERY = 16  # calls between recomputations of the p99s: recording is on every batch's path


class CallTimes:
    """Recent call times of one replica (or of all of them, pooled)."""

    __slots__ = ("_per_row", "_seconds", "_since_refresh", "p99_per_row_s", "p99_s")

    def __init__(self) -> None:
        self._seconds: deque[float] = deque(maxlen=WINDOW)
        self._per_row: deque[float] = deque(maxlen=WINDOW)
        self._since_refresh = 0
        self.p99_s = self.p99_per_row_s = math.inf  # inf until MIN_SAMPLES calls were seen

    def record(self, seconds: float, rows: int) -> None:
        self._seconds.append(seconds)
        self._per_row.append(seconds / max(rows, 1))
        self._since_refresh += 1
        if len(self._seconds) >= MIN_SAMPLES and (self._since_refresh >= REFRESH_EVERY or self.p99_s == math.inf):
            self.p99_s, self.p99_per_row_s = _p99(self._seconds), _p99(self._per_row)
            self._since_refresh = 0

    @property
    def ready(self) -> bool:
        return self.p99_s != math.inf

    def expected_s(self, rows: int) -> float:
        """A slow-but-normal call time for a batch of `rows` rows (inf before MIN_SAMPLES calls)."""
        return max(self.p99_s, rows * self.p99_per_row_s)


class StragglerWatch:
    """Per replica: its recent call times (the overdue bound) and whether it is a suspect."""

    def __init__(self, floor_s: float = FLOOR_S, multiple: float = MULTIPLE, suspect_s: float = SUSPECT_S) -> None:
        self.floor_s, self.multiple, self.suspect_s = floor_s, multiple, suspect_s
        self._times: dict[str, CallTimes] = {}
        self._pooled = CallTimes()
        self._suspect_until: dict[str, float] = {}

    def overdue_after_s(self, worker_id: str, rows: int) -> float:
        """Seconds after which a call of `rows` rows to `worker_id` is overdue (inf: never)."""
        times = self._times.get(worker_id)
        if times is None or not times.ready:
            times = self._pooled
        return max(self.floor_s, self.multiple * times.expected_s(rows))

    def record(self, worker_id: str, seconds: float, rows: int) -> None:
        """A call that delivered `rows` rows in `seconds`; the replica answered, so it is no suspect.

        A call longer than its bound counts as taking the bound: one freeze does not blunt the next
        hedge, while a replica that slowed down for good still raises its bound fourfold per refresh.
        """
        seconds = min(seconds, self.overdue_after_s(worker_id, rows))
        times = self._times.get(worker_id)
        if times is None:
            times = self._times[worker_id] = CallTimes()
        times.record(seconds, rows)
        self._pooled.record(seconds, rows)
        self.answered(worker_id)

    def answered(self, worker_id: str) -> None:
        """The replica answered a call (an error reply too): it is not stuck."""
        if self._suspect_until:
            self._suspect_until.pop(worker_id, None)

    def suspect(self, worker_id: str) -> None:
        self._suspect_until[worker_id] = time.monotonic() + self.suspect_s

    def is_suspect(self, worker_id: str) -> bool:
        return bool(self._suspect_until) and self._suspect_until.get(worker_id, 0.0) > time.monotonic()

    def keep_only(self, worker_ids: set[str]) -> None:
        """Forget the replicas that left the registry (one that comes back starts from the pooled times)."""
        for gone in self._times.keys() - worker_ids:
            del self._times[gone]
        for gone in self._suspect_until.keys() - worker_ids:
            del self._suspect_until[gone]


def _p99(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
