"""Registry of expert-worker replicas: which worker serves which (layer, expert), at what address.

Routers read it on every request, so lookups are local dictionary reads; implementations keep
that local view current. `InProcessRegistry` (single host, the default) is filled by the router
itself from the workers it was given; `moe_serve.redis_registry.RedisRegistry` follows a shared
Redis server that workers register into with a heartbeat.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from moe_serve.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRecord:
    """One worker replica as the registry knows it."""

    worker_id: str
    address: str
    experts: tuple[ExpertKey, ...]
    node_id: str = ""
    gpu_id: int = -1
    weights_version: str = ""
    compute_datatype: str = ""
    load: dict[str, float] = field(default_factory=dict, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data["experts"] = [list(key) for key in self.experts]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        data = json.loads(text)
        data["experts"] = tuple(ExpertKey(int(layer), int(expert)) for layer, expert in data["experts"])
        return cls(**data)

    def to_proto(self) -> moe_pb2.WorkerInfo:
        return moe_pb2.WorkerInfo(
            worker_id=self.worker_id,
            address=self.address,
            node_id=self.node_id,
            gpu_id=self.gpu_id,
            experts=[moe_pb2.ExpertKey(layer=k.layer, expert=k.expert) for k in self.experts],
            weights_version=self.weights_version,
            compute_datatype=self.compute_datatype,
        )

    @classmethod
    def from_proto(cls, info: moe_pb2.WorkerInfo) -> WorkerRecord:
        return cls(
            worker_id=info.worker_id,
            address=info.address,
            experts=tuple(ExpertKey(k.layer, k.expert) for k in info.experts),
            node_id=info.node_id,
            gpu_id=info.gpu_id,
            weights_version=info.weights_version,
            compute_datatype=info.compute_datatype,
        )


class Registry:
    """Read side: the current replicas of every expert, as a local snapshot."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._replicas: dict[ExpertKey, tuple[WorkerRecord, ...]] = {}
        self._listeners: list[Callable[[], None]] = []

    def replicas(self, key: ExpertKey) -> tuple[WorkerRecord, ...]:
        """Live replicas serving `key` (empty when none)."""
        return self._replicas.get(key, ())

    def workers(self) -> list[WorkerRecord]:
        return sorted(self._workers.values(), key=lambda record: record.worker_id)

    def covers(self, keys: Iterable[ExpertKey]) -> bool:
        """True when every key has at least one replica."""
        return all(self._replicas.get(key) for key in keys)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the replica set."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Begin following the source of registrations (nothing to do in-process)."""

    async def close(self) -> None:
        """Stop following; the last snapshot stays readable."""

    def _replace_all(self, records: Iterable[WorkerRecord]) -> None:
        workers = {record.worker_id: record for record in records}
        if workers == self._workers:
            return
        replicas: dict[ExpertKey, list[WorkerRecord]] = {}
        for record in workers.values():
            for key in record.experts:
                replicas.setdefault(key, []).append(record)
        self._workers = workers
        self._replicas = {key: tuple(sorted(rs, key=lambda r: r.worker_id)) for key, rs in replicas.items()}
        logger.info("registry: %d worker replica(s): %s", len(workers), ", ".join(sorted(workers)) or "none")
        for listener in self._listeners:
            listener()


class InProcessRegistry(Registry):
    """Single-host registry, written by the process that owns it."""

    def register(self, record: WorkerRecord) -> None:
        self._replace_all([*(r for r in self._workers.values() if r.worker_id != record.worker_id), record])

    def deregister(self, worker_id: str) -> None:
        self._replace_all(r for r in self._workers.values() if r.worker_id != worker_id)
