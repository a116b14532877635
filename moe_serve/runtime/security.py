"""Transport security: who may call an internal service, TLS on the public port, mutual TLS inside.

Internal hops (gateway <-> router <-> workers, worker registration, deliveries, admin) are
authenticated by default with a **cluster secret**: every internal call carries a token derived
from it (`x-moe-serve-cluster-token` metadata, checked in constant time before the request is
read), and registry records in Redis are signed with another key derived from it. `moe-serve up`
makes a fresh secret at start and hands it to its children by environment, never on a command
line; stand-alone services take it from MOE_SERVE_CLUSTER_SECRET or a 0600 file
(MOE_SERVE_CLUSTER_SECRET_FILE, e.g. a Compose or Kubernetes secret). `--insecure-internal` turns
this off for debugging only.

On the long-lived internal streams the token is checked once per stream, so it costs nothing per
message; mutual TLS, optional on top, encrypts every message (bench: `moe_serve.bench.auth_cost`).
With mutual TLS, every internal server demands a client certificate signed by the internal CA.
Workers are reached at addresses only known at run time (container or Ray node IPs), so internal
clients check the server certificate for one fixed name (`internal_tls_server_name`, default
"moe-serve-internal") instead of the dialed host; the trust decision is "signed by the internal
CA", as in a service mesh. Certificates come from files; `moe-serve certs` writes a development set.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from moe_serve_client.channel import ClientCredentials as ClientCredentials  # re-exported for the tools

logger = logging.getLogger(__name__)
DEFAULT_INTERNAL_SERVER_NAME = "moe-serve-internal"
CLUSTER_TOKEN_METADATA = "x-moe-serve-cluster-token"
CLUSTER_SECRET_ENV = "MOE_SERVE_CLUSTER_SECRET"
MIN_SECRET_CHARS = 16
# orchestrators probe health without credentials; reflection describes the API, nothing more
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the {what} file {path}: {error.strerror}") from None


@dataclass(frozen=True)
class InternalTLS:
    """The internal CA, this service's certificate and key (PEM bytes), and the name servers are checked for."""

    ca: bytes
    cert: bytes
    key: bytes = b""
    server_name: str = DEFAULT_INTERNAL_SERVER_NAME

    @classmethod
    def from_files(
        cls, ca: Path, cert: Path, key: Path, server_name: str = DEFAULT_INTERNAL_SERVER_NAME
    ) -> InternalTLS:
        return cls(_read(ca, "internal CA"), _read(cert, "certificate"), _read(key, "private key"), server_name)

    @classmethod
    def from_settings(cls, settings: Any) -> InternalTLS | None:
        """From a settings object with internal_tls_* fields; None when internal TLS is off."""
        if settings.internal_tls_ca is None:
            return None
        return cls.from_files(
            settings.internal_tls_ca,
            settings.internal_tls_cert,
            settings.internal_tls_key,
            settings.internal_tls_server_name,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)]


@dataclass(frozen=True)
class PublicTLS:
    """TLS of the gateway's public port; with `client_ca`, clients must also present a certificate."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> PublicTLS | None:
        if settings.tls_cert is None:
            return None
        client_ca = _read(settings.tls_client_ca, "client CA") if settings.tls_client_ca else None
        return cls(_read(settings.tls_cert, "certificate"), _read(settings.tls_key, "private key"), client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=self.client_ca is not None
        )


def new_cluster_secret() -> str:
    """A fresh cluster secret (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def write_secret_file(path: Path, secret: str) -> Path:
    """Write `secret` to `path`, created readable by its owner only (never wider, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # an older file may have wider permissions; O_CREAT would keep them
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return path


def read_secret_file(path: Path) -> str:
    text = _read(path, "cluster secret").decode(errors="replace").strip()
    if path.stat().st_mode & 0o077:
        logger.warning("the cluster secret file %s is readable by other users; make it 0600", path)
    return text


def given_secret(settings: Any) -> str:
    """The secret set directly (MOE_SERVE_CLUSTER_SECRET), "" when none: an empty value counts as
    unset (Compose passes MOE_SERVE_CLUSTER_SECRET= when the shell has none)."""
    return settings.cluster_secret.get_secret_value() if settings.cluster_secret is not None else ""


def _derive(secret: bytes, purpose: str) -> bytes:
    """One key per use, so a token seen on the wire cannot sign registry records."""
    return hmac.new(secret, f"moe-serve/{purpose}/v1".encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class ClusterCredentials:
    """What proves a caller belongs to this stack: the cluster secret and, optionally, mutual TLS.

    `secret` None means --insecure-internal: every internal call is accepted (a warning is logged
    at start-up); registry records are then neither signed nor checked for a signature.
    """

    secret: bytes | None = field(default=None, repr=False)
    tls: InternalTLS | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> ClusterCredentials:
        """From a settings object with cluster_secret(_file), insecure_internal and internal_tls_* fields.

        Raises ValueError, with what to set, when there is no secret and insecure_internal is off.
        """
        tls = InternalTLS.from_settings(settings)
        secret = given_secret(settings)
        if not secret and settings.cluster_secret_file is not None:
            secret = read_secret_file(settings.cluster_secret_file)
        if settings.insecure_internal:
            logger.warning(
                "INSECURE: --insecure-internal is set: this service's internal RPCs accept any caller that can "
                "reach them, and registry records are not authenticated. For debugging only."
            )
            return cls(None, tls)
        if not secret:
            raise ValueError(
                f"internal hops are authenticated by a cluster secret and none is set: give every service of the "
                f"stack the same secret in {CLUSTER_SECRET_ENV} or in a file readable only by them "
                f"({CLUSTER_SECRET_ENV}_FILE, --cluster-secret-file); `moe-serve up` makes one by itself, "
                f"`moe-serve certs` writes one; --insecure-internal runs without (debugging only)"
            )
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the cluster secret must have at least {MIN_SECRET_CHARS} characters")
        return cls(secret.encode(), tls)

    @property
    def insecure(self) -> bool:
        return self.secret is None

    @cached_property
    def call_token(self) -> str:
        return "" if self.secret is None else _derive(self.secret, "internal-call").hex()

    @cached_property
    def record_key(self) -> bytes | None:
        """The key registry records are signed with (None: insecure, records are not signed)."""
        return None if self.secret is None else _derive(self.secret, "registry-record")

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata every internal call carries (None when insecure)."""
        return None if self.secret is None else ((CLUSTER_TOKEN_METADATA, self.call_token),)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return None if self.tls is None else self.tls.server_credentials()

    def server_interceptors(self) -> list[aio.ServerInterceptor]:
        return [] if self.secret is None else [ClusterTokenInterceptor(self.call_token)]


INSECURE_INTERNAL = ClusterCredentials()


class CallerCheck(aio.ServerInterceptor):
    """Base of the interceptors that decide who may call: every call but health and reflection (and
    unknown methods, which gRPC answers UNIMPLEMENTED) goes through `check`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        return self.check(handler, details)

    def check(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        """`handler` when the caller may call it, else a refusal (see refusal_handler)."""
        raise NotImplementedError


class ClusterTokenInterceptor(CallerCheck):
    """Refuses (UNAUTHENTICATED) every call but health and reflection that lacks the cluster token,
    before its request is read."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def check(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        offered = next((v for k, v in details.invocation_metadata or () if k == CLUSTER_TOKEN_METADATA), None)
        if isinstance(offered, str) and hmac.compare_digest(offered.encode(), self._token):
            return handler
        logger.warning("refused an internal call to %s without a valid cluster token", details.method)
        reason = "a wrong cluster token" if offered else "no cluster token"
        return refusal_handler(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{details.method} is internal to a moe-serve stack and the call carried {reason}; "
            f"only services started with the stack's cluster secret may call it",
        )


def refusal_handler(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers `code` without reading the request, for a method of any shape.

    It is a stream handler even for unary methods: gRPC reads a unary request in full before its
    handler runs, while a stream handler ends the call before a byte of the body is buffered.
    """

    async def refuse(_requests: Any, context: aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class _TokenOnUnaryCalls(aio.UnaryUnaryClientInterceptor):
    """Adds the cluster token to every unary call of an asyncio channel. Streams are opened with the
    metadata given explicitly (moe_serve.runtime.streams): an aio stream interceptor would add a queue hop
    to every message of the data path."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(details._replace(metadata=_with_token(details.metadata, self._metadata)), request)


def _with_token(metadata: Any, token: tuple[tuple[str, str], ...]) -> aio.Metadata:
    merged = aio.Metadata(*token)
    for key, value in metadata or ():
        merged.add(key, value)
    return merged


class _TokenOnCalls(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The blocking channel's twin: the cluster token on every call (control-plane tools only)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*self._metadata, *(details.metadata or ())],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def open_aio_channel(address: str, options: list[tuple[str, Any]], credentials: ClusterCredentials) -> aio.Channel:
    """An asyncio channel to an internal service: the cluster token on unary calls, mutual TLS when configured."""
    metadata = credentials.call_metadata()
    interceptors = [_TokenOnUnaryCalls(metadata)] if metadata else None
    if credentials.tls is None:
        return aio.insecure_channel(address, options=options, interceptors=interceptors)
    tls = credentials.tls
    return aio.secure_channel(
        address, tls.channel_credentials(), options=[*options, *tls.channel_options()], interceptors=interceptors
    )


def open_channel(address: str, options: list[tuple[str, Any]], credentials: ClusterCredentials) -> grpc.Channel:
    """The blocking twin of `open_aio_channel` (controller, launcher, command-line tools)."""
    tls = credentials.tls
    if tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])
    metadata = credentials.call_metadata()
    return grpc.intercept_channel(channel, _TokenOnCalls(metadata)) if metadata else channel
