"""gRPC plumbing shared by every service: options, server creation, error mapping, health.

`ErrorMappingInterceptor` is the one place where domain errors become gRPC statuses: a
MoEServeError keeps its code and message; anything unexpected is logged with its stack trace
and the caller gets INTERNAL with a short reference, never the trace itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moe_serve.runtime.errors import ConfigurationError, InvalidInput, MoEServeError
from moe_serve_client.channel import KEEPALIVE_MS
from moe_serve_client.channel import channel_options as channel_options  # re-exported: one set for every hop
from moe_serve_client.protos import _pool as kserve_pool

logger = logging.getLogger(__name__)

READY_MARKER = "MOE_SERVE_READY"
# channel options for a peer that may still be starting (workers and a controller started beside
# their router): retry the connection every 100 ms, not after gRPC's default 1 s backoff that grows
# from there, so the first call lands the moment the peer listens (a refused connect costs nothing)
QUICK_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# grpc.health.v1 service name that answers SERVING while the process serves at all (an orchestrator's
# liveness probe), where "" is readiness
LIVENESS_SERVICE = "liveness"


def server_options(max_message_bytes: int, max_receive_bytes: int | None = None) -> list[tuple[str, Any]]:
    """Options for every server: the size limits (received messages may be held to a tighter one than
    sent ones), and acceptance of our clients' keepalive pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; left at its 5-minute default, an
        # idle channel's 30 s pings count as abuse and the server sends GOAWAY(too_many_pings)
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ]


class Undecodable:
    """Stands in for a request whose bytes are not a valid message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, RuntimeError) as error:
            return Undecodable(error)

    return deserialize


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Maps exceptions raised by handlers of every shape to gRPC statuses (the only place that does).

    An undecodable single request is answered INVALID_ARGUMENT instead of gRPC's generic
    INTERNAL; handlers of a request stream see an `Undecodable` message and raise.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary_response(method, handler.unary_unary, check_request=True),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _guard_unary_response(method, handler.stream_unary, check_request=False),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_streamed_responses(method, handler.unary_stream, check_request=True),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _guard_streamed_responses(method, handler.stream_stream, check_request=False),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        return handler


def _reject_undecodable(method: str, request: Any) -> None:
    if isinstance(request, Undecodable):
        raise InvalidInput(f"request bytes are not a valid {method} message")


def _guard_unary_response(
    method: str, behavior: Callable[..., Awaitable[Any]], check_request: bool
) -> Callable[[Any, aio.ServicerContext], Awaitable[Any]]:
    """Wrap a handler that returns one response (unary or streamed request)."""

    async def guarded(request: Any, context: aio.ServicerContext) -> Any:
        async with _mapped_errors(method, context):
            if check_request:
                _reject_undecodable(method, request)
            return await behavior(request, context)

    return guarded


def _guard_streamed_responses(method: str, behavior: Callable[..., Any], check_request: bool) -> Callable[..., Any]:
    """Wrap a handler that streams responses, keeping its shape: grpc.aio tells a handler that
    writes with `context.write` (a coroutine function) from one that yields (an async generator
    function, e.g. grpc-reflection's servicer) by inspecting it, so the wrapper must be the same kind."""
    if inspect.isasyncgenfunction(behavior):

        async def guarded_generator(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with _mapped_errors(method, context):
                if check_request:
                    _reject_undecodable(method, request)
                # aclosing: a cancelled call finalises the handler's generator now, not at garbage collection
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

        return guarded_generator

    async def guarded_writer(request: Any, context: aio.ServicerContext) -> None:
        async with _mapped_errors(method, context):
            if check_request:
                _reject_undecodable(method, request)
            await behavior(request, context)

    return guarded_writer


@contextlib.asynccontextmanager
async def _mapped_errors(method: str, context: aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except MoEServeError as error:
        await _abort(context, error.status_code, error.message)
    except (aio.AbortError, asyncio.CancelledError):
        raise
    except Exception:
        reference = uuid.uuid4().hex[:12]
        logger.exception("unexpected error in %s (reference %s)", method, reference)
        await _abort(
            context,
            grpc.StatusCode.INTERNAL,
            f"internal error in {method}; the server log has the details under reference {reference}",
        )


async def _abort(context: aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with `code`, unless the client is gone (cancelled, or its deadline passed, maybe
    at this very moment): then there is nobody to tell, and gRPC's failed send is not worth a log."""
    if context.done():
        return
    try:
        await context.abort(code, message)
    except aio.AbortError:
        raise
    except Exception as error:  # cygrpc.ExecuteBatchError: the call ended while the status was sent
        logger.debug("status %s not sent, the call had ended: %s", code.name, error)


def create_server(
    host: str,
    port: int,
    max_message_bytes: int,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    max_receive_bytes: int | None = None,
) -> tuple[aio.Server, int]:
    """An aio server bound to host:port (port 0 picks a free one); returns it and the real port.

    With `credentials` the port speaks TLS only. `interceptors` run before error mapping (so an
    authentication failure is reported before the request bytes are even decoded). A message over
    `max_receive_bytes` (default `max_message_bytes`) is refused by gRPC itself, RESOURCE_EXHAUSTED.
    """
    server = aio.server(
        interceptors=[*interceptors, ErrorMappingInterceptor()],
        options=server_options(max_message_bytes, max_receive_bytes),
    )
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc raises "Failed to bind" where older versions returned 0
        bound = 0
    if bound == 0:
        raise ConfigurationError(
            f"cannot listen on {address}: the port is in use or the host is not an address of this machine; "
            "choose another port (0 picks a free one) or host"
        )
    return server, bound


def add_health_and_reflection(
    server: aio.Server, service_names: Sequence[str], health_servicer: health.aio.HealthServicer | None = None
) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (all services start NOT_SERVING) and reflection; `health_servicer`, when
    given, answers health checks its own way (the gateway's readiness)."""
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=reflection_pool(names))
    return health_servicer


def reflection_pool(service_names: Sequence[str]) -> descriptor_pool.DescriptorPool:
    """One pool holding the files of every named service and their imports, for the reflection servicer.

    The KServe services live in the client's private pool (`moe_serve_client.protos._pool`), the
    others in protobuf's default pool; reflection reads one pool, so it gets a copy of both.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for name in service_names:
        for source in (kserve_pool.POOL, descriptor_pool.Default()):
            try:
                add(source.FindServiceByName(name).file)
                break
            except KeyError:
                continue
    return pool


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def advertised_host(bind_host: str, advertise_host: str | None) -> str:
    """The host other services should dial to reach a server bound on `bind_host`."""
    if advertise_host:
        return advertise_host
    if bind_host in ("0.0.0.0", "::", "[::]", ""):
        return socket.gethostbyname(socket.gethostname())
    return bind_host


def announce_ready(service: str, **details: Any) -> None:
    """Print the machine-readable line launchers wait for, e.g. `MOE_SERVE_READY {"service": ...}`."""
    print(f"{READY_MARKER} {json.dumps({'service': service, **details})}", flush=True)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Root logging of a process: text, or JSON lines for log shippers (moe_serve.runtime.log_format)."""
    from moe_serve.runtime.log_format import configure_logging as configure

    configure(level, "json" if log_format == "json" else "text")


async def drain(is_idle: Callable[[], bool], grace_s: float, poll_s: float = 0.02) -> bool:
    """Wait until `is_idle()` (no request in flight), at most `grace_s`; True if it got idle.

    Servers stop with `stop(0)` afterwards: the internal streams stay open between requests, so
    waiting for open calls (gRPC's own grace) would always wait the full grace period.
    """
    deadline = asyncio.get_running_loop().time() + grace_s
    while not is_idle():
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


async def wait_for_termination() -> None:
    """Return on SIGINT or SIGTERM (the signals `docker stop`, Ctrl-C and launchers send)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
