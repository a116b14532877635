"""Measuring helpers: latency percentiles, resident memory, loopback bytes, concurrent clients."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


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


def _status_field(pid: int, name: str) -> int:
    """An integer field of /proc/<pid>/status (raises OSError when the process is gone)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} for pid {pid}")


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB (from /proc)."""
    return _status_field(pid, "VmRSS") / 1024


def process_resources(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, open file descriptors, threads) of a live process, from /proc; OSError once it is gone."""
    return rss_mib(pid), len(os.listdir(f"/proc/{pid}/fd")), _status_field(pid, "Threads")


def loopback_tx_bytes() -> int:
    """Bytes sent on the loopback interface so far (every local hop crosses it once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


@dataclass
class ConcurrentRun:
    """Calls made by concurrent clients: tokens served, wall time from the common start, latencies."""

    tokens: int
    elapsed_s: float
    latencies_ms: list[float]

    def summary(self, clients: int) -> dict[str, Any]:
        return {
            "clients": clients,
            "tokens_per_s": self.tokens / self.elapsed_s,
            "latency_ms": asdict(Latency.of(self.latencies_ms)),
        }

    @classmethod
    def merge(cls, runs: list[ConcurrentRun]) -> ConcurrentRun:
        """Runs of one subject in several rounds, as if they were one run."""
        return cls(
            tokens=sum(r.tokens for r in runs),
            elapsed_s=sum(r.elapsed_s for r in runs),
            latencies_ms=[latency for r in runs for latency in r.latencies_ms],
        )


# a client: opened once per thread, it returns the call that sends its i-th request (and the tokens sent)
ClientOpener = Callable[[int], AbstractContextManager[Callable[[int], int]]]


def run_concurrent(open_client: ClientOpener, clients: int, per_client: int, timeout_s: float = 300.0) -> ConcurrentRun:
    """`clients` threads each make one unmeasured call, then `per_client` calls back to back.

    All threads start their measured calls together (a barrier), so the wall time covers only
    the concurrent part. A failing client fails the run rather than hanging the others.
    """
    latencies: list[float] = []
    tokens = 0
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1, timeout=timeout_s)

    def client(index: int) -> None:
        nonlocal tokens
        try:
            with open_client(index) as call:
                call(0)  # connect and warm up
                barrier.wait()
                for i in range(per_client):
                    started = time.perf_counter()
                    sent = call(i)
                    with lock:
                        latencies.append((time.perf_counter() - started) * 1000)
                        tokens += sent
        except BaseException as error:  # re-raised in the caller's thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    # a client that failed before the start broke the barrier; its error is raised after the join
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout_s)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return ConcurrentRun(tokens=tokens, elapsed_s=elapsed, latencies_ms=latencies)
