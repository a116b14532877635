"""The expert worker as a Ray actor: Ray places it (one per GPU with num_gpus=1), it serves gRPC.

The actor runs the same WorkerService as `moe-serve worker`, on an event loop of its own thread,
so gRPC traffic never waits on Ray's method-call machinery; Ray is used for placement and
lifetime only, never on the data path.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import ray

from expert_service.server import WorkerService
from moe_serve.config import WorkerSettings
from moe_serve.grpc_utils import configure_logging


class ExpertWorkerActor:
    """Hosts one expert worker. Construct with WorkerSettings fields as keyword values."""

    def __init__(self, settings: dict[str, Any]) -> None:
        worker_settings = WorkerSettings(**settings)
        configure_logging(worker_settings.log_level)
        context = ray.get_runtime_context()
        gpu_ids = ray.get_gpu_ids()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="worker-grpc-loop", daemon=True)
        self._thread.start()
        self._service = WorkerService(
            worker_settings, node_id=context.get_node_id(), gpu_id=int(gpu_ids[0]) if gpu_ids else None
        )
        self._record = asyncio.run_coroutine_threadsafe(self._service.start(), self._loop).result()

    def record_json(self) -> str:
        """The worker's registry record (address, experts, node, GPU) as JSON."""
        return self._record.to_json()

    def stop(self, grace_s: float = 5.0) -> None:
        """Deregister, finish in-flight calls within `grace_s`, stop serving."""
        asyncio.run_coroutine_threadsafe(self._service.stop(grace_s), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=grace_s + 5)
