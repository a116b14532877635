"""KServe v2 / Open Inference Protocol over HTTP/REST, served by the gateway beside gRPC.

A thin transport: FastAPI routes turn bodies into KServe messages (gateway/rest_codec.py) and hand
inferences to the same InferenceHandler as gRPC, so admission, capacity, deadlines, metrics and
statistics are one code path. Domain errors keep their meaning through one table (HTTP_STATUS).
uvicorn runs inside the gateway's event loop; the gateway owns the signals and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import moe_serve
from gateway.auth import TokenTable, bearer_token
from gateway.converters import model_metadata
from gateway.inference import InferenceHandler
from gateway.rest_codec import encode_rest_response, parameter_value, parse_rest_request
from moe_serve.runtime.errors import (
    ConfigurationError,
    InvalidInput,
    MoEServeError,
    PermissionDenied,
    Unauthenticated,
    quoted,
)

logger = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
# the protocol extensions this transport offers, by Triton's names (GET /v2)
REST_EXTENSIONS = ["binary_tensor_data", "parameters"]
# gRPC status -> HTTP status, as Triton's HTTP frontend maps its errors: overload is 503 (Triton
# answers a full queue UNAVAILABLE, i.e. 503), a passed deadline 504
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
NOT_READY = 400  # the protocol: a health or readiness probe answers 200 for true, 4xx for false


class RequestTooLarge(Exception):
    """A body over the gateway's request limit (413), refused before more of it is read."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed when sent gzip or deflate; at most `limit` bytes either way."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the body has {declared} bytes, more than this gateway's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the body is larger than this gateway's limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        # wbits: 16 + 15 reads gzip, 15 zlib ("deflate" in HTTP is the zlib format)
        inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as error:
            raise InvalidInput(f"the body is not valid {encoding} data: {error}") from None
        if len(body) > limit:
            raise RequestTooLarge(f"the decompressed body is larger than this gateway's limit of {limit} bytes")
    elif encoding != "identity":
        raise InvalidInput(f"Content-Encoding {quoted(encoding)} is not supported; send gzip, deflate or none")
    return body


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, got {quoted(value)}")
    return int(value)


class RestApi:
    """The routes, bound to the gateway's handler, its tokens (None: no auth) and its request limit."""

    def __init__(self, handler: InferenceHandler, tokens: TokenTable | None, max_request_bytes: int) -> None:
        self.handler, self.tokens, self.max_request_bytes = handler, tokens, max_request_bytes
        self.dataplane = handler.dataplane

    def authorize(self, request: Request, model: str | None) -> None:
        """As gateway/auth.py on gRPC: the same bearer token, 401 without a known one, 403 for a model
        it does not grant (also for models that do not exist, so a token cannot probe which do)."""
        if self.tokens is None:
            return
        token = bearer_token([("authorization", request.headers.get("authorization", ""))])
        grant = self.tokens.grant_for(token) if token else None
        if grant is None:
            reason = "an unknown bearer token" if token else "no 'Authorization: Bearer <token>' header"
            raise Unauthenticated(f"{request.url.path} needs a valid bearer token; the request had {reason}")
        if model is not None and not grant.allows(model):
            logger.info("token %r refused for model %r (REST %s)", grant.name, model, request.url.path)
            raise PermissionDenied(f"this token does not grant access to model {quoted(model)}")

    async def ready(self) -> bool:
        return not self.dataplane.draining and await self.dataplane.ready()

    async def server_metadata(self, request: Request) -> JSONResponse:
        self.authorize(request, None)
        return JSONResponse({"name": "moe-serve", "version": moe_serve.__version__, "extensions": REST_EXTENSIONS})

    async def live(self, request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> JSONResponse:
        ready = await self.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else NOT_READY)

    async def model_metadata(self, request: Request, model: str, version: str = "") -> JSONResponse:
        self.authorize(request, model)
        self.dataplane.model.check_name(model, version)
        metadata = model_metadata(self.dataplane.model, self.dataplane.policy.describe())

        def tensors(entries: list) -> list[dict]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in entries]

        return JSONResponse(
            {
                "name": metadata.name,
                "versions": list(metadata.versions),
                "platform": metadata.platform,
                "inputs": tensors(metadata.inputs),
                "outputs": tensors(metadata.outputs),
                "parameters": {key: parameter_value(value) for key, value in metadata.parameters.items()},
            }
        )

    async def model_ready(self, request: Request, model: str, version: str = "") -> JSONResponse:
        self.authorize(request, model)
        self.dataplane.model.check_name(model, version)
        ready = await self.ready()
        return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else NOT_READY)

    async def infer(self, request: Request, model: str, version: str = "") -> Response:
        self.authorize(request, model)  # before a byte of the body is read
        body = await read_body(request, self.max_request_bytes)
        rest_request = parse_rest_request(body, _header_length(request), model, version)
        del body  # the message holds its own copy: the body need not live through the inference
        response = await self.handler.infer(
            rest_request.message,
            "inference.HTTP/infer",
            list(request.headers.items()),
            rest_request.timeout_s,
            rpc=False,
        )
        content, header_length = encode_rest_response(rest_request, response)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


def create_app(handler: InferenceHandler, tokens: TokenTable | None, max_request_bytes: int) -> FastAPI:
    """The REST application: the protocol's health, metadata and inference endpoints (with and
    without `/versions/{version}`); every error a JSON `{"error": ...}` with its HTTP status."""
    api = RestApi(handler, tokens, max_request_bytes)
    app = FastAPI(title="moe-serve KServe v2 REST", version=moe_serve.__version__, docs_url=None, redoc_url=None)
    app.add_api_route("/v2", api.server_metadata, methods=["GET"])
    app.add_api_route("/v2/health/live", api.live, methods=["GET"])
    app.add_api_route("/v2/health/ready", api.server_ready, methods=["GET"])
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.add_api_route(prefix, api.model_metadata, methods=["GET"])
        app.add_api_route(f"{prefix}/ready", api.model_ready, methods=["GET"])
        app.add_api_route(f"{prefix}/infer", api.infer, methods=["POST"])

    @app.exception_handler(MoEServeError)
    async def domain_error(request: Request, error: MoEServeError) -> JSONResponse:
        return error_response(HTTP_STATUS.get(error.status_code, 500), error.message)

    @app.exception_handler(RequestTooLarge)
    async def too_large(request: Request, error: RequestTooLarge) -> JSONResponse:
        return error_response(413, f"{error}; send fewer tokens per request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no endpoint {request.url.path}; this server offers the KServe v2 endpoints under /v2"
        else:
            message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(error.status_code, message, error.headers)  # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        reference = uuid.uuid4().hex[:12]
        logger.error("unexpected error in %s (reference %s)", request.url.path, reference, exc_info=error)
        return error_response(
            500, f"internal error in {request.url.path}; the server log has the details under reference {reference}"
        )

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's loop: the gateway owns SIGINT/SIGTERM (it drains first), so
    uvicorn must not install handlers of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RestServer:
    """The REST port: bound at start (port 0 picks a free one), closed at stop."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
    ) -> None:
        self.host, self.port = host, port
        config = uvicorn.Config(
            app,
            log_config=None,  # the gateway's logging, not uvicorn's
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=2,  # admitted requests are drained before stop()
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            ssl_ca_certs=tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        self.server = _EmbeddedServer(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve in the running loop; returns the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as error:
            raise ConfigurationError(f"cannot bind the REST port {self.host}:{self.port}: {error.strerror}") from None
        port = sock.getsockname()[1]
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("the REST server stopped while starting")
            await asyncio.sleep(0.01)
        return port

    async def stop(self) -> None:
        """Close the port and open connections (keep-alive ones included), then return."""
        if self.task is None:
            return
        self.server.should_exit = True
        await self.task
