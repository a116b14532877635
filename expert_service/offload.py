"""The device tier of expert offloading: a budgeted cache of experts ready to compute.

A worker owns more experts than its device may hold at once (`--device-memory-budget`). Every
owned expert waits in the host tier (expert_service/experts.py); the device tier holds the ones
in use and the most useful others, within the budget, never evicting an expert that a compute
thread is using (a pin count). Loads happen on demand (a miss), ahead of a batch's own later
experts (lookahead), or on a hint from the router (prefetch: the next layer's likely experts).

Accounting is honest about what prefetch bought: a use is a hit only when the expert was resident
or its load was started by a hint; the first use of a load the batch itself caused is a miss.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from moe_serve.checkpoint import ExpertWeights
from moe_serve.cluster.placement import ExpertKey

Origin = Literal["demand", "lookahead", "hint"]
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str | None, owned_bytes: int) -> int | None:
    """Bytes of the device tier: None/"" = no offloading; "0.25" or "25%" = a fraction of the owned
    experts' size in the compute dtype; "512MiB", "2GB" or "1073741824" = bytes."""
    if text is None or not str(text).strip():
        return None
    value = str(text).strip().lower()
    if value.endswith("%"):
        fraction = float(value[:-1]) / 100
    elif "." in value:
        fraction = float(value)
    else:
        match = re.fullmatch(r"(\d+)\s*([a-z]*)", value)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"device memory budget {text!r}: give bytes (e.g. 512MiB, 2GB) or a fraction (0.25, 25%)")
        return int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < fraction <= 1:
        raise ValueError(f"device memory budget {text!r}: a fraction must be in (0, 1]")
    return int(fraction * owned_bytes)


class EvictionPolicy(Protocol):
    """Chooses which resident, unpinned expert leaves the device tier."""

    def record_use(self, key: ExpertKey) -> None: ...

    def record_arrival(self, key: ExpertKey) -> None:
        """An expert loaded ahead of use (hint, lookahead): it is about to be used, so it must not be
        the next victim, e.g. of the demand miss of the batch that comes before the one it is for."""

    def forget(self, key: ExpertKey) -> None: ...

    def victim(self, candidates: list[ExpertKey]) -> ExpertKey: ...


class LRUPolicy:
    """Least recently used leaves first."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def record_use(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    record_arrival = record_use

    def forget(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: list[ExpertKey]) -> ExpertKey:
        rank = {key: index for index, key in enumerate(self._order)}
        return min(candidates, key=lambda key: rank.get(key, -1))


class LFUPolicy:
    """Least frequently used over the last `window_s` seconds leaves first (ties: least recently used)."""

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self._clock = window_s, clock
        self._uses: deque[tuple[float, ExpertKey]] = deque()
        self._counts: Counter[ExpertKey] = Counter()
        self._recency = LRUPolicy()

    def record_use(self, key: ExpertKey) -> None:
        self._uses.append((self._clock(), key))
        self._counts[key] += 1
        self._recency.record_use(key)

    def record_arrival(self, key: ExpertKey) -> None:
        self._recency.record_use(key)  # recent, but no use counted: frequency stays earned by use

    def forget(self, key: ExpertKey) -> None:
        self._recency.forget(key)

    def victim(self, candidates: list[ExpertKey]) -> ExpertKey:
        horizon = self._clock() - self.window_s
        while self._uses and self._uses[0][0] < horizon:
            self._counts[self._uses.popleft()[1]] -= 1
        least = min(self._counts[key] for key in candidates)
        return self._recency.victim([key for key in candidates if self._counts[key] == least])


POLICIES: dict[str, Callable[[float], EvictionPolicy]] = {
    "lru": lambda window_s: LRUPolicy(),
    "lfu": lambda window_s: LFUPolicy(window_s),
}


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    loads: Counter[str] = field(default_factory=Counter)  # by origin
    bytes_moved: int = 0
    load_seconds: float = 0.0  # time spent copying experts into the tier
    wait_seconds: float = 0.0  # time compute threads waited for a load
    evictions: int = 0
    unused_prefetches: int = 0  # hinted experts evicted before any use


@dataclass(eq=False)
class _Entry:
    key: ExpertKey
    nbytes: int
    origin: Origin
    pins: int = 0
    weights: ExpertWeights | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    first_use_is_miss: bool = False
    used: bool = False


class DeviceTier:
    """Experts materialised for compute, within `budget_bytes` (None: unbounded). Thread-safe."""

    def __init__(
        self,
        budget_bytes: int | None,
        load: Callable[[ExpertKey], ExpertWeights],
        size_of: Callable[[ExpertKey], int],
        policy: EvictionPolicy,
    ) -> None:
        self.budget_bytes, self._load, self._size_of, self.policy = budget_bytes, load, size_of, policy
        self.stats = TierStats()
        self.used_bytes = 0  # resident plus loads in flight: never above the budget
        self.peak_bytes = 0
        self._entries: dict[ExpertKey, _Entry] = {}
        self._wanted: Counter[ExpertKey] = Counter()  # experts of batches in progress: prefetch spares them
        self._pending_hints: list[ExpertKey] = []
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ compute path

    @contextmanager
    def use(self, key: ExpertKey) -> Iterator[ExpertWeights]:
        """The weights of `key`, pinned (never evicted) until the block ends; loads on a miss."""
        entry, load_here = self._pin(key)
        try:
            if load_here:
                self._fill(entry)
            elif not entry.ready.is_set():
                started = time.perf_counter()
                entry.ready.wait()
                with self._cond:
                    self.stats.wait_seconds += time.perf_counter() - started
            if entry.error is not None:
                raise entry.error
            assert entry.weights is not None
            yield entry.weights
        finally:
            with self._cond:
                entry.pins -= 1
                self._cond.notify_all()

    def _pin(self, key: ExpertKey) -> tuple[_Entry, bool]:
        """Pin the entry of `key`, creating it (to be loaded by the caller) on a miss. When every
        resident expert is in use, wait for one to be released, then look again: meanwhile another
        thread may have started loading this very expert."""
        with self._cond:
            self.policy.record_use(key)
            while True:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.pins += 1
                    if entry.first_use_is_miss:
                        entry.first_use_is_miss = False
                        self.stats.misses += 1
                    else:
                        self.stats.hits += 1
                    entry.used = True
                    return entry, False
                entry = self._reserve(key, "demand", spare_wanted=False)
                if entry is not None:
                    self.stats.misses += 1
                    entry.pins, entry.used = 1, True
                    return entry, True
                self._cond.wait()

    # ------------------------------------------------------------------ ahead of use

    @contextmanager
    def batch(self, keys: Iterable[ExpertKey], start_load: Callable[[Callable[[], None]], None]) -> Iterator[None]:
        """Around one batch: its experts are spared by prefetch, and the missing ones (that fit
        without evicting anything in use) start loading now, overlapping with the others' compute."""
        keys = list(dict.fromkeys(keys))
        with self._cond:
            self._wanted.update(keys)
        try:
            self._start(keys, "lookahead", start_load)
            yield
        finally:
            with self._cond:
                self._wanted.subtract(keys)
                self._wanted += Counter()  # drop zero counts
                pending, self._pending_hints = self._pending_hints, []
            if pending:  # hints that found no room while this batch needed it
                self.prefetch(pending, start_load)

    def prefetch(self, keys: Iterable[ExpertKey], start_load: Callable[[Callable[[], None]], None]) -> int:
        """Load hinted experts if room can be made without touching any in use or wanted; returns loads
        started. Those that find no room are retried once the batches in progress finish (the newest
        hint replaces older ones: it is the better guess)."""
        keys = list(dict.fromkeys(keys))
        started = self._start(keys, "hint", start_load)
        with self._cond:
            self._pending_hints = [key for key in keys if key not in self._entries] if self._wanted else []
        return started

    def _start(self, keys: list[ExpertKey], origin: Origin, start_load: Callable[[Callable[[], None]], None]) -> int:
        started = []
        with self._cond:
            protected = set(keys)
            for key in keys:
                if key in self._entries:
                    continue
                entry = self._reserve(key, origin, spare_wanted=True, protected=protected)
                if entry is None:
                    break  # no room without evicting what is needed: the rest would not fit either
                entry.first_use_is_miss = origin == "lookahead"
                started.append(entry)
        for entry in started:
            start_load(lambda entry=entry: self._fill(entry))
        return len(started)

    # ------------------------------------------------------------------ space

    def _reserve(
        self, key: ExpertKey, origin: Origin, spare_wanted: bool, protected: set[ExpertKey] | None = None
    ) -> _Entry | None:
        """Make room for `key` by evicting unpinned, loaded experts (not `protected` ones, nor those
        batches in progress want when `spare_wanted`), then add its entry, loading. The caller holds
        the lock; None when no room can be made now."""
        need = self._size_of(key)
        if self.budget_bytes is not None and need > self.budget_bytes:
            raise ValueError(f"expert {tuple(key)} needs {need} bytes, more than the device budget {self.budget_bytes}")
        spare = protected or set()
        while self.budget_bytes is not None and self.used_bytes + need > self.budget_bytes:
            candidates = [
                k
                for k, e in self._entries.items()
                if e.pins == 0 and e.ready.is_set() and k not in spare and not (spare_wanted and self._wanted[k])
            ]
            if not candidates:
                return None
            self._evict(self.policy.victim(candidates))
        entry = _Entry(key, need, origin)
        self._entries[key] = entry
        self.used_bytes += need
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        self.stats.loads[origin] += 1
        if origin != "demand":
            self.policy.record_arrival(key)
        return entry

    def _evict(self, key: ExpertKey) -> None:
        entry = self._entries.pop(key)
        self.used_bytes -= entry.nbytes
        self.stats.evictions += 1
        if entry.origin == "hint" and not entry.used:
            self.stats.unused_prefetches += 1
        self.policy.forget(key)

    def _fill(self, entry: _Entry) -> None:
        """Copy the expert in (outside the lock); on failure the reservation is given back."""
        started = time.perf_counter()
        try:
            entry.weights = self._load(entry.key)
        except BaseException as error:
            with self._cond:
                entry.error = error
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
                    self.used_bytes -= entry.nbytes
                self._cond.notify_all()
            entry.ready.set()
            if entry.origin != "demand":
                return  # a failed prefetch only costs the miss it was meant to save
            raise
        with self._cond:
            self.stats.bytes_moved += entry.nbytes
            self.stats.load_seconds += time.perf_counter() - started
            self._cond.notify_all()
        entry.ready.set()

    def insert(self, weights: dict[ExpertKey, ExpertWeights]) -> None:
        """Experts materialised elsewhere (resident mode: every owned expert, at start)."""
        with self._cond:
            for key, value in weights.items():
                entry = _Entry(key, self._size_of(key), "demand", weights=value)
                entry.ready.set()
                if key in self._entries:
                    self.used_bytes -= self._entries[key].nbytes
                self._entries[key] = entry
                self.used_bytes += entry.nbytes
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def discard(self, keys: Iterable[ExpertKey]) -> None:
        """Experts this worker no longer owns leave the tier (their rows are no longer in flight)."""
        with self._cond:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.pins == 0 and entry.ready.is_set():
                    self._evict(key)

    def resident(self) -> list[ExpertKey]:
        with self._cond:
            return sorted(key for key, entry in self._entries.items() if entry.ready.is_set() and entry.error is None)
