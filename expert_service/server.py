"""Run one expert worker: load its experts, serve them over gRPC, keep it registered."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import torch
from grpc import aio

from expert_service.experts import ExpertStore
from expert_service.registration import RedisRegistration, Registration, RouterRegistration
from expert_service.servicer import ExpertWorkerServicer
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.placement import ExpertKey, expert_blocks, parse_expert_keys
from moe_serve.config import WorkerSettings
from moe_serve.model_spec import CONFIG_DTYPE_NAMES
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime import codec
from moe_serve.runtime.allocator import settle_startup_memory
from moe_serve.runtime.errors import ConfigurationError
from moe_serve.runtime.grpc_utils import advertised_host
from moe_serve.runtime.security import ClusterCredentials
from moe_serve.runtime.service import Service
from moe_serve.runtime.transports import start_engines
from moe_serve.worker_record import WorkerRecord

logger = logging.getLogger(__name__)
SERVICE_NAME = "moe_serve.v1.ExpertWorker"


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(requested: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    return checkpoint_dtype if requested == "auto" else CONFIG_DTYPE_NAMES[requested]


def owned_experts(settings: WorkerSettings, checkpoint: Checkpoint) -> list[ExpertKey]:
    """The (layer, expert) keys this worker loads: --experts, or its block of the placement plan."""
    spec = checkpoint.spec
    if not settings.experts:
        # the shared expert, if any, is placed like any other (id E)
        expert_ids = expert_blocks(spec.num_placed_experts, settings.num_workers)[settings.worker_index]
        return [ExpertKey(layer, expert) for layer in spec.moe_layers for expert in expert_ids]
    try:
        keys = parse_expert_keys(settings.experts, spec.moe_layers)
    except ValueError as error:
        raise ConfigurationError(f"--experts: {error}") from None
    for key in keys:
        if key.layer not in spec.moe_layers or key.expert >= spec.num_placed_experts:
            shared = f"; expert {spec.shared_expert_id} is the shared expert" if spec.num_shared_slots else ""
            raise ConfigurationError(
                f"--experts {settings.experts}: no expert {key.expert} in layer {key.layer} (MoE layers "
                f"{list(spec.moe_layers)}, experts 0-{spec.num_placed_experts - 1}{shared})"
            )
    return keys


class WorkerService(Service[WorkerSettings]):
    """An expert worker's lifetime: start (load + serve + register), stop (deregister + drain)."""

    role = "worker"
    health_service = SERVICE_NAME

    def __init__(self, settings: WorkerSettings, node_id: str = "", gpu_id: int | None = None) -> None:
        super().__init__(settings)
        self.node_id, self.gpu_id = node_id, gpu_id
        self.server: aio.Server | None = None
        self.servicer: ExpertWorkerServicer | None = None
        self.registration: Registration | None = None
        self.record: WorkerRecord | None = None

    async def start(self) -> WorkerRecord:
        settings = self.settings
        self.prepare()
        self.credentials = credentials = self.load_security(lambda: ClusterCredentials.from_settings(settings))
        checkpoint = Checkpoint(settings.checkpoint)
        start_engines(settings.transports)  # before serving: a stream's first batch never waits for one
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, checkpoint.spec.dtype)
        store = ExpertStore(
            checkpoint,
            owned_experts(settings, checkpoint),
            dtype,
            device,
            settings.device_memory_budget,
            settings.eviction_policy,
            settings.lfu_window_s,
        )
        weights_version = checkpoint.fingerprint()
        checkpoint.close()
        server, port = self.create_server(
            settings.port, credentials.server_credentials(), credentials.server_interceptors()
        )
        host = advertised_host(settings.host, settings.advertise_host)
        address = f"{host}:{port}"
        self.telemetry = self.open_telemetry()
        metrics_port = self.telemetry.metrics_address.rpartition(":")[2] if self.telemetry.metrics_address else ""
        gpu_id = self.gpu_id if self.gpu_id is not None else (device.index if device.type == "cuda" else -1)
        self.record = WorkerRecord(
            worker_id=settings.worker_id or f"worker-{address.replace(':', '-')}-{os.getpid()}-{uuid.uuid4().hex[:4]}",
            address=address,
            experts=tuple(store.keys),
            node_id=self.node_id or os.uname().nodename,
            gpu_id=-1 if gpu_id is None else gpu_id,
            weights_version=weights_version,
            compute_datatype=codec.datatype_name(dtype),
            metrics_address=f"{host}:{metrics_port}" if metrics_port else "",
        )
        self.servicer = ExpertWorkerServicer(
            store,
            self.record,
            settings.checkpoint,
            settings.compute_threads,
            settings.max_message_bytes,
            publish=self._publish,
            telemetry=self.telemetry,
            credentials=credentials,
            transports=settings.transports,
            shared_memory_bytes=settings.shared_memory_bytes,
        )
        moe_grpc.add_ExpertWorkerServicer_to_server(self.servicer, server)
        self.add_health(server, [SERVICE_NAME])
        await server.start()
        await self.set_health(True)
        self.server = server
        settle_startup_memory()
        self.registration = self._make_registration()
        if self.registration is not None:
            await self.registration.start()
        logger.info("worker %s serving %d expert(s) at %s", self.record.worker_id, len(store.keys), address)
        return self.record

    def _make_registration(self) -> Registration | None:
        settings, snapshot = self.settings, self.servicer.record
        if settings.redis_url:
            return RedisRegistration(
                settings.redis_url,
                settings.redis_prefix,
                snapshot,
                settings.registry_ttl_s,
                self.credentials.record_key,
            )
        if settings.router_address:
            return RouterRegistration(settings.router_address, snapshot, settings.registry_ttl_s, self.credentials)
        return None

    async def _publish(self) -> None:
        if self.registration is not None:
            await self.registration.publish()

    async def refuse_new(self) -> None:
        """Deregister: routers stop sending rows here (health stays SERVING for the rows already sent)."""
        if self.registration is not None:
            await self.registration.stop()

    def idle(self) -> bool:
        assert self.servicer is not None
        return self.servicer.load.inflight_rows == 0

    async def stop(self, grace_s: float = 5.0) -> None:
        """Deregister (routers stop sending), finish in-flight batches (up to `grace_s`), close."""
        if self.server is not None:
            await self.drain(grace_s)
            await self.server.stop(0)
        if self.servicer is not None:
            await self.servicer.close()
            self.telemetry.shutdown()

    def ready_details(self) -> dict[str, Any]:
        record = self.record
        assert record is not None
        return {
            "address": record.address,
            "worker_id": record.worker_id,
            "experts": sorted({key.expert for key in record.experts}),
            "metrics_address": record.metrics_address,
        }
