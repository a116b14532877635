"""Run the router: load the router weights, follow the registry, serve Route calls."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2

from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.placement import ExpertKey
from moe_serve.config import RouterSettings
from moe_serve.model_spec import CONFIG_DTYPE_NAMES
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.registry_trust import RecordPolicy
from moe_serve.runtime.allocator import settle_startup_memory
from moe_serve.runtime.grpc_utils import LIVENESS_SERVICE
from moe_serve.runtime.security import ClusterCredentials
from moe_serve.runtime.service import Service
from moe_serve.runtime.telemetry import Telemetry
from moe_serve.runtime.transports import start_engines
from router_service.fanout import Dispatcher
from router_service.hints import OffloadHints
from router_service.metrics import RouterMetrics
from router_service.planner import RoutingPlanner
from router_service.prefetch import ExpertForecast
from router_service.redis_registry import RedisRegistry
from router_service.registry import InProcessRegistry, Registry, RegistryServicer
from router_service.servicer import RouterServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = "moe_serve.v1.Router"
REGISTRY_SERVICE = "moe_serve.v1.WorkerRegistry"


class RouterService(Service[RouterSettings]):
    role = "router"
    health_service = SERVICE_NAME

    def __init__(self, settings: RouterSettings, telemetry: Telemetry | None = None) -> None:
        """`telemetry`: the owning process's, when the router runs inside a gateway (embedded)."""
        super().__init__(settings)
        self.server: aio.Server | None = None
        self.address = ""
        self._shared_telemetry = telemetry

    async def start(self) -> str:
        settings = self.settings
        self.prepare()
        credentials = self.load_security(lambda: ClusterCredentials.from_settings(settings))
        checkpoint = Checkpoint(settings.checkpoint)
        dtype = checkpoint.spec.dtype if settings.dtype == "auto" else CONFIG_DTYPE_NAMES[settings.dtype]
        spec = checkpoint.spec
        keys = [ExpertKey(layer, e) for layer in spec.moe_layers for e in range(spec.num_placed_experts)]
        # only workers of this model, holding these very weights, signed by this cluster, are routed to
        policy = RecordPolicy(frozenset(keys), checkpoint.fingerprint(), credentials.record_key)
        planner = RoutingPlanner(checkpoint, dtype, settings.noisy_gating_std, settings.noisy_gating_seed)
        self.registry = self._make_registry(policy)
        await self.registry.start()
        start_engines(settings.transports if settings.shared_memory_bytes > 0 else ())
        model_name = settings.model_name or checkpoint.name
        self.telemetry = self._shared_telemetry or self.open_telemetry()
        metrics = RouterMetrics(self.telemetry, model_name, self.registry, keys)
        self.dispatcher = Dispatcher(
            self.registry,
            settings.max_dispatch_attempts,
            settings.max_message_bytes,
            settings.split_min_rows,
            metrics,
            credentials,
            OffloadHints(
                self.registry,
                ExpertForecast(spec.moe_layers, spec.num_experts) if settings.prefetch else None,
                credentials,
            ),
            settings.shared_memory_bytes,
            self.telemetry.tracer,
            settings.transports,
        )
        self.servicer = RouterServicer(
            planner, self.registry, self.dispatcher, model_name, self.telemetry.tracer, metrics
        )
        server, port = self.create_server(
            settings.port, credentials.server_credentials(), credentials.server_interceptors()
        )
        moe_grpc.add_RouterServicer_to_server(self.servicer, server)
        services = [SERVICE_NAME]
        if isinstance(self.registry, InProcessRegistry):  # workers register here when there is no Redis
            moe_grpc.add_WorkerRegistryServicer_to_server(RegistryServicer(self.registry), server)
            services.append(REGISTRY_SERVICE)
        health = self.add_health(server, [*services, LIVENESS_SERVICE])
        # liveness: the process serves (its API answers); "" says every expert has a replica
        await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self.server = server
        self.address = self.advertised_address(port)
        settle_startup_memory()

        async def publish_health() -> None:
            await self.set_health(self.servicer.ready() and not self.servicer.draining)

        self.registry.add_listener(lambda: asyncio.ensure_future(publish_health()))
        await publish_health()
        logger.info(
            "router for %s at %s (%s, layers %s)",
            self.servicer.model_name,
            self.address,
            dtype,
            list(checkpoint.spec.moe_layers),
        )
        return self.address

    def _make_registry(self, policy: RecordPolicy) -> Registry:
        settings = self.settings
        if settings.redis_url:
            return RedisRegistry(settings.redis_url, settings.redis_prefix, settings.registry_ttl_s, policy)
        return InProcessRegistry(policy)

    async def refuse_new(self) -> None:
        """New routes get UNAVAILABLE, and health says NOT_SERVING."""
        self.servicer.draining = True
        await self.set_health(False)

    def idle(self) -> bool:
        return self.dispatcher.idle()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new routes (UNAVAILABLE), finish dispatching what was routed (up to `grace_s`), then close."""
        if self.server is not None:
            await self.drain(grace_s)
            await self.server.stop(0)
        await self.dispatcher.close()
        await self.registry.close()
        if self._shared_telemetry is None:
            self.telemetry.shutdown()

    def ready_details(self) -> dict[str, Any]:
        return {"address": self.address, "metrics_address": self.telemetry.metrics_address}
