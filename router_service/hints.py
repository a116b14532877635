"""The router's side of expert offloading: what each offloading worker holds, and prefetch hints.

Workers that offload report the experts resident in their device tier with every ComputeResult
(fresher than the registry heartbeat); replica choice prefers a replica holding the expert. After
each routed request the forecast (router_service/prefetch.py) names the experts the next layer
will likely use, and every offloading replica of those experts that does not hold them gets a
Prefetch hint: a small unary call, sent in the background, whose failure only costs a miss.
Workers that keep all their experts resident are never sent hints.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import torch
from grpc import aio

from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.channels import StubPool
from moe_serve.runtime.security import ClusterCredentials
from moe_serve.worker_record import WorkerRecord
from router_service.prefetch import ExpertForecast
from router_service.registry import Registry

logger = logging.getLogger(__name__)
HINT_TIMEOUT_S = 2.0


class OffloadHints:
    def __init__(self, registry: Registry, forecast: ExpertForecast | None, credentials: ClusterCredentials) -> None:
        self.registry, self.forecast = registry, forecast
        # worker id -> layer -> expert ids resident after its last batch of that layer
        self._resident: dict[str, dict[int, frozenset[int]]] = defaultdict(dict)
        self._stubs = StubPool(moe_grpc.ExpertWorkerStub, 1 << 20, credentials)
        self._tasks: set[asyncio.Task[None]] = set()
        self.hints_sent = 0

    def offloading(self) -> bool:
        return any(worker.offload for worker in self.registry.workers())

    def resident(self, worker: WorkerRecord, key: ExpertKey) -> bool:
        """Whether `worker` holds `key` in its device tier (always true for a worker that does not offload)."""
        if not worker.offload:
            return True
        by_layer = self._resident.get(worker.worker_id)
        if by_layer is not None and key.layer in by_layer:
            return key.expert in by_layer[key.layer]
        return key in worker.resident

    def record(self, worker: WorkerRecord, layer: int, result: moe_pb2.ComputeResult) -> None:
        if worker.offload:
            self._resident[worker.worker_id][layer] = frozenset(int(e) for e in result.resident_experts)

    def after_route(self, sequence_id: str, layer: int, expert_ids: torch.Tensor) -> None:
        """Learn from a routed request, then hint the experts of the next layer it predicts."""
        if self.forecast is None or not self.offloading():
            return
        self.forecast.observe(sequence_id, layer, expert_ids)
        wanted: dict[str, tuple[WorkerRecord, list[ExpertKey]]] = {}
        for key in self.forecast.predict(layer, expert_ids):
            for worker in self.registry.replicas(key):
                if worker.offload and not self.resident(worker, key):
                    wanted.setdefault(worker.worker_id, (worker, []))[1].append(key)
        for worker, keys in wanted.values():
            task = asyncio.create_task(self._send(worker, keys))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, worker: WorkerRecord, keys: list[ExpertKey]) -> None:
        request = moe_pb2.ExpertSet(experts=[moe_pb2.ExpertKey(layer=k.layer, expert=k.expert) for k in keys])
        try:
            await self._stubs.get(worker.address).Prefetch(request, timeout=HINT_TIMEOUT_S)
            self.hints_sent += 1
        except aio.AioRpcError as error:
            logger.debug("prefetch hint to %s failed: %s", worker.worker_id, error.code().name)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stubs.close()
