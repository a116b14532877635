"""The skeleton the gateway, the router and the expert worker share: start, health, drain, serve, stop.

Each service's `start` composes its own servers and handlers; the steps every one of them takes in
the same way live here, so a service reads as what it adds:

    threads and security (`prepare`, `load_security`) -> telemetry (`open_telemetry`) -> server
    (`create_server`, `advertised_address`) -> health (`add_health`, `set_health`) -> serve

and its `stop` drains the same way: refuse new work (`refuse_new`), wait until `idle` (at most the
grace period), then close. `serve` runs a service as its own process until SIGINT/SIGTERM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import grpc
import torch
from grpc import aio
from grpc_health.v1 import health

from moe_serve.runtime.allocator import tune_allocator
from moe_serve.runtime.errors import ConfigurationError
from moe_serve.runtime.grpc_utils import (
    add_health_and_reflection,
    advertised_host,
    announce_ready,
    create_server,
    drain,
    set_serving,
    wait_for_termination,
)
from moe_serve.runtime.telemetry import Telemetry

T = TypeVar("T")


class ServiceSettings(Protocol):
    """What the skeleton reads of a service's settings (every service's settings class has these)."""

    host: str
    advertise_host: str | None
    prometheus_port: int | None
    max_message_bytes: int
    torch_threads: int


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


class Service(ABC, Generic[SettingsT]):
    """One service's lifetime. Subclasses set `role` and `health_service` and implement `start`,
    `idle`, `stop` and `ready_details`; `refuse_new` says how they stop taking work when draining."""

    # "gateway", "router" or "worker": the ready line's service and the telemetry's "moe-serve-<role>"
    role: ClassVar[str]
    # the gRPC service whose health status says whether this service takes requests
    health_service: ClassVar[str]

    def __init__(self, settings: SettingsT) -> None:
        self.settings = settings
        self.health: health.aio.HealthServicer | None = None

    # ------------------------------------------------------------------ start

    @abstractmethod
    async def start(self) -> object:
        """Load, bind and serve; returns what callers address the service by."""

    def prepare(self) -> None:
        """Process-wide settings every service applies before loading anything."""
        torch.set_num_threads(self.settings.torch_threads)

    @staticmethod
    def load_security(build: Callable[[], T]) -> T:
        """Credentials, certificates and tokens from settings: a bad file or value is a configuration
        error that stops the service with its message, not a stack trace."""
        try:
            return build()
        except ValueError as error:
            raise ConfigurationError(str(error)) from None

    def open_telemetry(self) -> Telemetry:
        return Telemetry(f"moe-serve-{self.role}", self.settings.prometheus_port, self.settings.host)

    def create_server(
        self,
        port: int,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[aio.ServerInterceptor] = (),
        max_receive_bytes: int | None = None,
    ) -> tuple[aio.Server, int]:
        """A server on the service's host and `port` (0: any free one); returns it and the real port."""
        settings = self.settings
        return create_server(
            settings.host, port, settings.max_message_bytes, credentials, interceptors, max_receive_bytes
        )

    def advertised_address(self, port: int) -> str:
        """host:port other services dial to reach a server of this service on `port`."""
        return f"{advertised_host(self.settings.host, self.settings.advertise_host)}:{port}"

    # ------------------------------------------------------------------ health

    def add_health(
        self,
        server: aio.Server,
        service_names: Sequence[str],
        servicer: health.aio.HealthServicer | None = None,
    ) -> health.aio.HealthServicer:
        """grpc.health.v1 and reflection on `server` (all NOT_SERVING until set); kept as this service's health."""
        self.health = add_health_and_reflection(server, service_names, servicer)
        return self.health

    async def set_health(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for `health_service` and the server as a whole ("")."""
        assert self.health is not None, "add_health first"
        await set_serving(self.health, [self.health_service], serving)

    # ------------------------------------------------------------------ drain and stop

    async def refuse_new(self) -> None:
        """Stop taking new work; by default by reporting NOT_SERVING."""
        await self.set_health(False)

    @abstractmethod
    def idle(self) -> bool:
        """No work in flight: draining is done."""

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work, then wait until idle, at most `grace_s`; True if it got idle."""
        await self.refuse_new()
        return await drain(self.idle, grace_s)

    @abstractmethod
    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain (up to `grace_s`), then close what `start` opened."""

    # ------------------------------------------------------------------ serve

    @abstractmethod
    def ready_details(self) -> dict[str, Any]:
        """The fields of the ready line launchers wait for (addresses, model, ...)."""

    @classmethod
    async def serve(cls, settings: SettingsT) -> None:
        """Run the service in this process until SIGINT/SIGTERM."""
        tune_allocator()
        service = cls(settings)
        await service.start()
        announce_ready(cls.role, **service.ready_details())
        await wait_for_termination()
        await service.stop()
