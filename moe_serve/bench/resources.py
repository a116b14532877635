"""Resource sampling of service processes: resident memory, open file descriptors and threads over
time, and their growth after a warm-up (for the soak benchmark)."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from moe_serve.bench.measure import process_resources

# growth is judged on the median of this many samples at each end of the measured window, so a
# single sample taken during a burst (a large request's buffers, a momentary extra thread) does not
# decide the verdict
EDGE_SAMPLES = 5


@dataclass(frozen=True)
class Sample:
    """One look at a process: seconds since sampling began, RSS in MiB, open fds, threads."""

    t_s: float
    rss_mib: float
    fds: int
    threads: int


@dataclass
class ServiceSamples:
    name: str
    pid: int
    samples: list[Sample] = field(default_factory=list)
    # set when the process could not be read (it exited): a service that dies fails the soak
    lost: str | None = None


@dataclass(frozen=True)
class Growth:
    """Growth from the start to the end of the post-warm-up window (medians of EDGE_SAMPLES each)."""

    rss_mib_start: float
    rss_mib_end: float
    rss_mib_peak: float
    rss_growth_pct: float
    fds_start: float
    fds_end: float
    fd_growth: float
    threads_start: float
    threads_end: float
    thread_growth: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(self).items()}


class ResourceSampler:
    """Samples every named process every `interval_s` seconds on a background thread."""

    def __init__(self, pids: dict[str, int], interval_s: float) -> None:
        self.services = {name: ServiceSamples(name, pid) for name, pid in pids.items()}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample_once(self) -> None:
        elapsed = time.monotonic() - self._started
        for service in self.services.values():
            if service.lost is not None:
                continue
            try:
                rss, fds, threads = process_resources(service.pid)
            except OSError as error:  # the process exited (or is not ours to read)
                service.lost = f"{type(error).__name__} at {elapsed:.1f} s"
                continue
            service.samples.append(Sample(round(elapsed, 3), round(rss, 3), fds, threads))

    def _run(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.interval_s):
                self.sample_once()  # the state right at the end of the load
                return


def growth_after(samples: list[Sample], warmup_s: float) -> Growth | None:
    """Growth over the samples taken at or after `warmup_s`; None with fewer than two of them."""
    measured = [s for s in samples if s.t_s >= warmup_s]
    if len(measured) < 2:
        return None
    edge = max(1, min(EDGE_SAMPLES, len(measured) // 2))
    first, last = measured[:edge], measured[-edge:]

    def median(window: list[Sample], attribute: str) -> float:
        return float(statistics.median(getattr(s, attribute) for s in window))

    rss_start, rss_end = median(first, "rss_mib"), median(last, "rss_mib")
    fds_start, fds_end = median(first, "fds"), median(last, "fds")
    threads_start, threads_end = median(first, "threads"), median(last, "threads")
    return Growth(
        rss_mib_start=rss_start,
        rss_mib_end=rss_end,
        rss_mib_peak=max(s.rss_mib for s in measured),
        rss_growth_pct=100.0 * (rss_end - rss_start) / rss_start,
        fds_start=fds_start,
        fds_end=fds_end,
        fd_growth=fds_end - fds_start,
        threads_start=threads_start,
        threads_end=threads_end,
        thread_growth=threads_end - threads_start,
        samples=len(measured),
    )
