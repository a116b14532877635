"""How a client reaches the gateway's public port: channel options and credentials.

The server's own hops use the same options (`moe_serve.runtime.grpc_utils` imports them from here), so a
message-size limit means the same thing on every hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

# the largest gRPC message sent or received (bytes); a request carries T * d * itemsize of hidden states
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
KEEPALIVE_MS = 30_000


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options for every client channel: one message-size limit on every hop, keepalive pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # internal hops are long-lived; pings find a peer that vanished without closing its socket
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


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
