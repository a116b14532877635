"""Measuring helpers: latency percentiles, resident memory, loopback bytes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Latency:
    """Milliseconds over `count` calls."""

    p50: float
    p99: float
    mean: float
    count: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> Latency:
        ordered = sorted(samples_ms)
        return cls(
            p50=statistics.median(ordered),
            p99=ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            mean=statistics.fmean(ordered),
            count=len(ordered),
        )


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loopback_tx_bytes() -> int:
    """Bytes sent on the loopback interface so far (every local hop crosses it once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")
