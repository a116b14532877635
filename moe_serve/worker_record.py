"""A worker replica as the registry knows it: `WorkerRecord`, its JSON and protobuf forms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2

LOAD_FIELDS = ("inflight_rows", "queued_rows", "rows_per_s", "compute_p50_ms")
OFFLOAD_COUNTERS = (
    "budget_bytes",
    "resident_bytes",
    "hits",
    "misses",
    "bytes_moved",
    "load_seconds",
    "evictions",
    "prefetched",
    "unused_prefetches",
    "peak_bytes",
)


@dataclass(frozen=True)
class WorkerRecord:
    """One worker replica as the registry knows it; `load` is its live load at the last heartbeat."""

    worker_id: str
    address: str
    experts: tuple[ExpertKey, ...]
    node_id: str = ""
    gpu_id: int = -1
    weights_version: str = ""
    compute_datatype: str = ""
    load: dict[str, float] = field(default_factory=dict, compare=False)
    metrics_address: str = ""
    # expert offloading: OFFLOAD_COUNTERS plus "resident" ([[layer, expert], ...]); empty when off
    offload: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data["experts"] = [list(key) for key in self.experts]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        data = json.loads(text)
        data["experts"] = tuple(ExpertKey(int(layer), int(expert)) for layer, expert in data["experts"])
        return cls(**data)

    @property
    def resident(self) -> frozenset[ExpertKey]:
        """Experts in the device tier at the last heartbeat (offloading workers only)."""
        return frozenset(ExpertKey(int(layer), int(expert)) for layer, expert in self.offload.get("resident", ()))

    def to_proto(self) -> moe_pb2.WorkerInfo:
        return moe_pb2.WorkerInfo(
            worker_id=self.worker_id,
            address=self.address,
            node_id=self.node_id,
            gpu_id=self.gpu_id,
            experts=[moe_pb2.ExpertKey(layer=k.layer, expert=k.expert) for k in self.experts],
            weights_version=self.weights_version,
            compute_datatype=self.compute_datatype,
            load=moe_pb2.WorkerLoad(**{name: self.load.get(name, 0) for name in LOAD_FIELDS}),
            metrics_address=self.metrics_address,
            offload=moe_pb2.OffloadState(
                **{name: self.offload[name] for name in OFFLOAD_COUNTERS if name in self.offload},
                resident=[moe_pb2.ExpertKey(layer=k.layer, expert=k.expert) for k in sorted(self.resident)],
            )
            if self.offload
            else None,
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
            load={name: getattr(info.load, name) for name in LOAD_FIELDS},
            metrics_address=info.metrics_address,
            offload={
                **{name: getattr(info.offload, name) for name in OFFLOAD_COUNTERS},
                "resident": [[k.layer, k.expert] for k in info.offload.resident],
            }
            if info.HasField("offload")
            else {},
        )
