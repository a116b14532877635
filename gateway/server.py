"""Run the gateway: public KServe v2 servers (gRPC and HTTP/REST) plus the internal delivery endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2

from gateway.admission import AdmissionController
from gateway.auth import BearerTokenInterceptor, TokenTable
from gateway.capacity_policy import CapacityPolicy
from gateway.dataplane import DataPlane
from gateway.deliveries import DeliveryServicer, PendingRequests
from gateway.inference import InferenceHandler
from gateway.live_state import LiveState, LiveStatePublisher, LoadWindow
from gateway.metrics import GatewayMetrics
from gateway.model import ServedModel
from gateway.readiness import LIVENESS_SERVICE, ReadinessHealthServicer, ReadinessMonitor
from gateway.rest import RestServer, create_app
from gateway.routing import EmbeddedRouter, RemoteRouter
from gateway.servicer import InferenceServicer
from gateway.shared_memory import SharedMemoryRegistry
from gateway.stats import ExpertCounters, GatewayAdminServicer
from moe_serve.config import GatewaySettings, embedded_router_settings
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.allocator import settle_startup_memory
from moe_serve.runtime.channels import StubPool
from moe_serve.runtime.errors import ConfigurationError
from moe_serve.runtime.grpc_utils import add_health_and_reflection, advertised_host, channel_options, set_serving
from moe_serve.runtime.security import ClusterCredentials, PublicTLS, open_aio_channel
from moe_serve.runtime.service import Service
from moe_serve.runtime.streams import StreamClient
from moe_serve.runtime.transports import start_engines
from moe_serve.worker_record import WorkerRecord
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from router_service.server import RouterService

logger = logging.getLogger(__name__)
PUBLIC_SERVICE = "inference.GRPCInferenceService"
DELIVERY_SERVICE = "moe_serve.v1.DeliveryService"
ADMIN_SERVICE = "moe_serve.v1.GatewayAdmin"


async def registered_workers(router: moe_grpc.RouterStub) -> list[dict]:
    """The registry's workers with their live load, as plain dicts (for the live-state document)."""
    reply = await router.ListWorkers(moe_pb2.ListWorkersRequest(), timeout=2.0)
    return [json.loads(WorkerRecord.from_proto(info).to_json()) for info in reply.workers]


async def fetch_model_info(router: moe_grpc.RouterStub, address: str, timeout_s: float) -> moe_pb2.ModelInfo:
    """Ask the router what it serves, retrying until it is up or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await router.GetModelInfo(moe_pb2.ModelInfoRequest(), timeout=2.0)
        except aio.AioRpcError as error:
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"router at {address} did not answer within {timeout_s:.0f} s "
                    f"({error.code().name}: {error.details()})"
                ) from None
            await asyncio.sleep(0.2)


READINESS_PROBE_TIMEOUT_S = 0.5  # a probe waits at most this for the router (orchestrators give up at 1 s)
REQUEST_FRAMING_BYTES = 1 << 20  # names, shape, parameters and requested outputs beside the tensor


def largest_request_bytes(settings: GatewaySettings, model: ServedModel) -> int:
    """The public port's receive limit: what the largest admissible request can need (FP32, the widest
    input datatype), so a body admission would refuse is refused by gRPC before it is buffered."""
    admissible = settings.max_request_tokens * model.hidden_size * 4 + REQUEST_FRAMING_BYTES
    return min(settings.max_request_bytes or admissible, settings.max_message_bytes)


def _internal_security(credentials: ClusterCredentials) -> str:
    """How the internal port is protected, for the start-up log line."""
    parts = ["INSECURE" if credentials.insecure else "cluster secret"]
    return ", " + " + ".join([*parts, *(["mutual TLS"] if credentials.tls else [])])


class GatewayService(Service[GatewaySettings]):
    role = "gateway"
    health_service = PUBLIC_SERVICE

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.public_server: aio.Server | None = None
        self.delivery_server: aio.Server | None = None
        self.address = self.delivery_address = self.router_address = ""
        self.embedded: RouterService | None = None  # the router, when it runs in this process
        self.rest: RestServer | None = None  # KServe v2 REST, unless settings.http is off
        self.http_address: str | None = None
        self._route_channel: aio.Channel | None = None  # the RouteStreams' channel (router as a service)

    async def start(self) -> str:
        """Reach the router (started here when embedded), build the data plane behind it, then open the
        internal delivery port, the public gRPC port and REST, in that order, and turn health on."""
        settings = self.settings
        self.prepare()
        internal, public_tls, tokens = self.load_security(
            lambda: (
                ClusterCredentials.from_settings(settings),
                PublicTLS.from_settings(settings),
                TokenTable.load(settings.auth_tokens_file) if settings.auth_tokens_file else None,
            )
        )
        self.telemetry = self.open_telemetry()
        self.pending = PendingRequests()
        router, model = await self._reach_router(internal)
        host = advertised_host(settings.host, settings.advertise_host)
        self._open_delivery_server(host, internal)
        window, live_state = self._build_accounting(model, router)
        metrics = GatewayMetrics(
            self.telemetry, model.name, self.counters, window, lambda: self.admission.inflight_tokens
        )
        self.router: RemoteRouter | EmbeddedRouter = self._build_route_client(internal, metrics)
        self.dataplane = self._build_dataplane(model, router, window, metrics)
        port = self._build_public_servers(model, public_tls, tokens, metrics)
        self.publisher = None
        if settings.redis_url:
            self.publisher = LiveStatePublisher(
                live_state, settings.redis_url, settings.redis_prefix, settings.live_state_interval_s
            )
            self.publisher.start()
        await self._start_serving(router, host)
        self.address = f"{host}:{port}"
        settle_startup_memory()
        logger.info(
            "gateway for model %r at %s%s (%s, requests up to %.1f MiB; deliveries at %s%s)",
            model.name,
            self.address,
            f", REST at {self.http_address}" if self.http_address else "",
            ("TLS" if public_tls else "plaintext") + (f", {len(tokens)} bearer token(s)" if tokens else ""),
            self.max_request_bytes / (1 << 20),
            self.delivery_address,
            _internal_security(internal),
        )
        return self.address

    async def _reach_router(self, internal: ClusterCredentials) -> tuple[moe_grpc.RouterStub, ServedModel]:
        """Start the embedded router (if configured), then ask the router what model it serves."""
        settings = self.settings
        self.router_address = settings.router_address
        if settings.embedded_router:
            self.embedded = RouterService(embedded_router_settings(settings), self.telemetry)
            self.router_address = await self.embedded.start()
        self._routers = StubPool(moe_grpc.RouterStub, settings.max_message_bytes, internal)
        router = self._routers.get(self.router_address)
        info = await fetch_model_info(router, self.router_address, settings.startup_timeout_s)
        return router, ServedModel.from_info(info, settings.model_name)

    def _open_delivery_server(self, host: str, internal: ClusterCredentials) -> None:
        """The internal port the experts deliver their outputs to (bound now, started with the others)."""
        self.delivery_server, delivery_port = self.create_server(
            self.settings.delivery_port, internal.server_credentials(), internal.server_interceptors()
        )
        start_engines(self.settings.transports)  # before serving: a delivery never waits for one
        servicer = DeliveryServicer(self.pending, self.telemetry.tracer, self.settings.transports)
        moe_grpc.add_DeliveryServiceServicer_to_server(servicer, self.delivery_server)
        self.delivery_address = f"{host}:{delivery_port}"

    def _build_accounting(self, model: ServedModel, router: moe_grpc.RouterStub) -> tuple[LoadWindow, LiveState]:
        """Admission, per-expert counters, the load window and the live state, served on the internal
        port's GatewayAdmin service."""
        settings = self.settings
        self.admission = AdmissionController(settings.max_inflight_tokens, settings.max_request_tokens)
        self.counters = ExpertCounters(model.moe_layers, model.num_experts + model.num_shared_slots)
        window = LoadWindow(model.num_experts, settings.load_window_s)
        live_state = LiveState(
            model.name, window, lambda: self.admission.inflight_tokens, lambda: registered_workers(router)
        )
        moe_grpc.add_GatewayAdminServicer_to_server(
            GatewayAdminServicer(self.counters, self.admission, live_state, self.pending), self.delivery_server
        )
        return window, live_state

    def _build_route_client(
        self, internal: ClusterCredentials, metrics: GatewayMetrics
    ) -> RemoteRouter | EmbeddedRouter:
        """How the data plane asks for route plans: in-process calls to the embedded router, or
        `router_streams` RouteStreams to the router service."""
        settings = self.settings
        if self.embedded is not None:
            return EmbeddedRouter(self.embedded.servicer, self.pending)
        # round_robin: the streams spread over every router the address resolves to
        options = [*channel_options(settings.max_message_bytes), ("grpc.lb_policy_name", "round_robin")]
        self._route_channel = open_aio_channel(settings.router_address, options, internal)
        streams: list[StreamClient[moe_pb2.RouteRequest, moe_pb2.RoutePlan]] = [
            StreamClient(
                settings.router_address,
                lambda channel: moe_grpc.RouterStub(channel).RouteStream,
                settings.max_message_bytes,
                internal,
                channel=self._route_channel,
            )
            for _ in range(settings.router_streams)
        ]
        return RemoteRouter(streams, settings.max_message_bytes, metrics.wire, self.telemetry.tracer)

    def _build_dataplane(
        self, model: ServedModel, router: moe_grpc.RouterStub, window: LoadWindow, metrics: GatewayMetrics
    ) -> DataPlane:
        """Admission, capacity, dispatch and combine for the served model, independent of any transport."""
        settings = self.settings
        policy = CapacityPolicy.resolve(
            settings.capacity_factor, settings.expert_capacity, settings.overflow, model.default_expert_capacity
        )
        return DataPlane(
            model,
            self.router,
            lambda: router.GetModelInfo(moe_pb2.ModelInfoRequest(), timeout=2.0),
            self.admission,
            self.pending,
            self.delivery_address,
            policy,
            self.counters,
            window,
            self.telemetry.tracer,
            metrics.wire,
            max_inflight_rows_per_replica=settings.max_inflight_rows_per_replica,
            batch_window_s=settings.batch_window_ms / 1000,
            max_batch_tokens=settings.max_batch_tokens,
            pipeline_chunk_tokens=settings.pipeline_chunk_tokens,
        )

    def _build_public_servers(
        self, model: ServedModel, public_tls: PublicTLS | None, tokens: TokenTable | None, metrics: GatewayMetrics
    ) -> int:
        """The public KServe v2 gRPC server (bound, not started) and, unless `http` is off, the REST
        server, both in front of one inference handler; returns the gRPC port."""
        settings = self.settings
        self.max_request_bytes = largest_request_bytes(settings, model)
        self.public_server, port = self.create_server(
            settings.port,
            public_tls.server_credentials() if public_tls else None,
            [BearerTokenInterceptor(tokens)] if tokens is not None else [],
            max_receive_bytes=self.max_request_bytes,
        )
        self.shared_memory = SharedMemoryRegistry(settings.allow_client_shm, self.max_request_bytes)
        handler = InferenceHandler(
            self.dataplane,
            settings.request_timeout_s,
            metrics,
            self.telemetry.tracer,
            self.shared_memory,
            samples_roots=self.telemetry.samples_roots,
        )
        self.servicer = InferenceServicer(handler)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.public_server)
        if settings.http:  # the same handler, admission and tokens behind the REST transport
            self.rest = RestServer(
                create_app(handler, tokens, self.max_request_bytes),
                settings.host,
                settings.http_port,
                settings.tls_cert,
                settings.tls_key,
                settings.tls_client_ca,
            )
        return port

    async def _start_serving(self, router: moe_grpc.RouterStub, host: str) -> None:
        """Add health to both gRPC servers, start them and REST, report SERVING, then keep readiness
        probing the router."""
        health = ReadinessHealthServicer()
        self.add_health(self.public_server, [PUBLIC_SERVICE], health)
        # the internal port answers health probes too (they need the internal certificate under mTLS)
        delivery_health = add_health_and_reflection(self.delivery_server, [DELIVERY_SERVICE, ADMIN_SERVICE])
        await self.delivery_server.start()
        await self.public_server.start()
        if self.rest is not None:
            self.http_address = f"{host}:{await self.rest.start()}"
        await set_serving(delivery_health, [DELIVERY_SERVICE, ADMIN_SERVICE], True)
        await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.readiness = health.monitor = ReadinessMonitor(
            lambda: router.GetModelInfo(moe_pb2.ModelInfoRequest(), timeout=READINESS_PROBE_TIMEOUT_S),
            self.set_health,
            lambda: self.dataplane.draining,
            self.settings.readiness_interval_s,
        )
        await self.readiness.check()
        self.readiness.start()

    def idle(self) -> bool:
        """No admitted request, and no streamed answer left to write."""
        return self.admission.inflight_requests == 0 and self.servicer.unwritten_stream_answers.count == 0

    async def refuse_new(self) -> None:
        """New requests get UNAVAILABLE; readiness stops probing and health says NOT_SERVING."""
        self.dataplane.draining = True
        await self.readiness.stop()
        await self.set_health(False)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests (UNAVAILABLE, health NOT_SERVING), finish admitted ones (up to `grace_s`),
        then close both servers; deliveries keep flowing until the last admitted request is answered."""
        if self.public_server is not None:
            drained = await self.drain(grace_s)
            if not drained:
                logger.warning(
                    "gateway stopping with %d request(s) still in flight after %.0f s",
                    self.admission.inflight_requests,
                    grace_s,
                )
            await self.public_server.stop(0)
            if self.rest is not None:
                await self.rest.stop()
            self.shared_memory.close()
        if self.delivery_server is not None:
            await self.delivery_server.stop(0)
        if self.embedded is not None:  # after the gateway: its last requests' batches finish first
            await self.embedded.stop(grace_s)
        if self.publisher is not None:
            await self.publisher.stop()
        self.telemetry.shutdown()
        await self.router.close()
        if self._route_channel is not None:
            await self._route_channel.close()
        await self._routers.close()

    def ready_details(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "delivery_address": self.delivery_address,
            # workers register here, and tools find the router here, when it runs in the gateway
            **({"router_address": self.router_address} if self.embedded is not None else {}),
            "http_address": self.http_address,
            "model": self.dataplane.model.name,
            "metrics_address": self.telemetry.metrics_address,
        }
