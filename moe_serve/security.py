"""Transport security: TLS on the public port, mutual TLS between the services.

Internal hops (gateway <-> router <-> workers, worker registration, deliveries) use one internal
CA: every internal server demands a client certificate signed by it, every internal client
presents one. Workers are reached at addresses only known at run time (container or Ray node
IPs), so internal clients check the server certificate for one fixed name
(`internal_tls_server_name`, default "moe-serve-internal") instead of the dialed host; the trust
decision is "signed by the internal CA", as in a service mesh. Certificates come from files;
`moe-serve certs` writes a development set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

DEFAULT_INTERNAL_SERVER_NAME = "moe-serve-internal"


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


def open_aio_channel(address: str, options: list[tuple[str, Any]], tls: InternalTLS | None) -> aio.Channel:
    """An asyncio channel to an internal service: mutual TLS when `tls` is given, plaintext otherwise."""
    if tls is None:
        return aio.insecure_channel(address, options=options)
    return aio.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])


def open_channel(address: str, options: list[tuple[str, Any]], tls: InternalTLS | None) -> grpc.Channel:
    """The blocking twin of `open_aio_channel` (controller, launcher, command-line tools)."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])


@dataclass(frozen=True)
class ClientCredentials:
    """How a client reaches the public port: TLS (given or system roots, optional client certificate)
    and an optional bearer token, sent as `authorization: Bearer <token>` metadata on every call."""

    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in reprs or logs

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None or self.certificate_chain is not None

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def _ssl(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        if not self.secure:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, self._ssl(), options=options)

    def aio_channel(self, address: str, options: list[tuple[str, Any]]) -> aio.Channel:
        if not self.secure:
            return aio.insecure_channel(address, options=options)
        return aio.secure_channel(address, self._ssl(), options=options)
