"""Load imbalance at a glance: a sliding window of what the gateway dispatched, and the live-state
document built from it (written to Redis for any tool, served by GatewayAdmin.GetLiveState).

Per MoE layer over the window: each routed expert's share of the rows, the max/mean imbalance
ratio (1.0 = perfectly even), and the capacity drop rate (dropped slots / routed slots). Plus
request latency p50/p99, throughput, tokens in flight, and the workers with their live load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import torch
from grpc import aio
from redis.exceptions import RedisError

from moe_serve.redis_keys import live_state_key
from moe_serve.runtime.outage import OutageLog

logger = logging.getLogger(__name__)
LIVE_STATE_TTL_S = 10


class LoadWindow:
    """What was dispatched in the last `window_s` seconds, per layer, and request latencies."""

    def __init__(self, num_experts: int, window_s: float = 60.0) -> None:
        self.num_experts, self.window_s = num_experts, window_s
        # rows per expert as plain ints: the window holds every dispatch of `window_s`, and a tensor
        # per entry would cost about a kilobyte
        self._dispatches: deque[tuple[float, int, tuple[int, ...], int, int]] = deque()
        self._latencies: deque[tuple[float, float, int]] = deque()

    def record_dispatch(self, layer: int, routed_rows: torch.Tensor, dropped_slots: int, slots: int) -> None:
        """routed_rows: [E] rows each routed expert received (shared expert excluded)."""
        now = time.monotonic()
        self._dispatches.append((now, layer, tuple(routed_rows[: self.num_experts].tolist()), dropped_slots, slots))
        self._trim(now)

    def record_request(self, seconds: float, tokens: int) -> None:
        now = time.monotonic()
        self._latencies.append((now, seconds, tokens))
        # trimmed here too, not only when read: without Redis or a metrics scrape nobody reads the
        # window, and it would keep every request since start-up
        self._trim(now)

    def _trim(self, now: float | None = None) -> None:
        horizon = (time.monotonic() if now is None else now) - self.window_s
        while self._dispatches and self._dispatches[0][0] < horizon:
            self._dispatches.popleft()
        while self._latencies and self._latencies[0][0] < horizon:
            self._latencies.popleft()

    def layers(self) -> dict[int, dict[str, Any]]:
        """layer -> load_share [E], imbalance (max/mean), drop_rate, rows."""
        self._trim()
        totals: dict[int, tuple[list[int], int, int]] = {}
        for _, layer, rows, dropped, slots in self._dispatches:
            previous = totals.get(layer, ([0] * self.num_experts, 0, 0))
            summed = [before + now for before, now in zip(previous[0], rows, strict=True)]
            totals[layer] = (summed, previous[1] + dropped, previous[2] + slots)
        view = {}
        for layer, (rows, dropped, slots) in sorted(totals.items()):
            total = sum(rows)
            share = [r / total for r in rows] if total else [0.0] * self.num_experts
            mean = total / self.num_experts
            view[layer] = {
                "rows": total,
                "load_share": share,
                "imbalance": max(rows) / mean if total else 1.0,
                "drop_rate": dropped / slots if slots else 0.0,
            }
        return view

    def latency(self) -> dict[str, float]:
        self._trim()
        latencies = sorted(seconds * 1000 for _, seconds, _ in self._latencies)
        if not latencies:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "requests_per_s": 0.0, "tokens_per_s": 0.0}
        return {
            "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "requests_per_s": len(latencies) / self.window_s,
            "tokens_per_s": sum(tokens for _, _, tokens in self._latencies) / self.window_s,
        }


class LiveState:
    """Builds the live-state document; `workers` fetches the registry view (router's ListWorkers)."""

    def __init__(
        self,
        model: str,
        window: LoadWindow,
        inflight_tokens: Callable[[], int],
        workers: Callable[[], Awaitable[list[dict[str, Any]]]],
    ) -> None:
        self.model, self.window, self.inflight_tokens, self.workers = model, window, inflight_tokens, workers

    async def document(self) -> dict[str, Any]:
        try:
            workers = await self.workers()
        except aio.AioRpcError as error:  # the router being away must not break the view
            logger.debug("live state without workers: %s", error.code().name)
            workers = []
        return {
            "model": self.model,
            "updated_at": time.time(),
            "window_s": self.window.window_s,
            "inflight_tokens": self.inflight_tokens(),
            **self.window.latency(),
            "layers": {str(layer): values for layer, values in self.window.layers().items()},
            "workers": workers,
        }


class LiveStatePublisher:
    """Writes the live state to Redis every `interval_s` (with a TTL, so a dead gateway's view expires)."""

    def __init__(self, live_state: LiveState, url: str, prefix: str, interval_s: float = 1.0) -> None:
        self.live_state, self.interval_s = live_state, interval_s
        self.key = live_state_key(prefix, live_state.model)
        self._client = aioredis.Redis.from_url(url)
        self._outage = OutageLog(f"live state in Redis at {url}")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="live-state-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            document = await self.live_state.document()
            try:
                await self._client.set(self.key, json.dumps(document), ex=LIVE_STATE_TTL_S)
            except (RedisError, OSError) as error:
                self._outage.failed(error)
            else:
                self._outage.recovered()
            await asyncio.sleep(self.interval_s)
