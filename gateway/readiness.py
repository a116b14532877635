"""The gateway's readiness, kept equal to what it can serve.

The gateway itself can always accept a call, so the question is whether the stack behind it can
answer one: the router must be reachable and report a live replica of every expert. A monitor asks
the router once per interval and publishes the answer on grpc.health.v1 (the whole server "" and
the KServe service, what orchestrators and load balancers probe for readiness). Liveness stays
about this process: the "liveness" service is SERVING for as long as it runs, so a router outage
takes the gateway out of rotation without getting it restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from grpc import aio
from grpc_health.v1 import health, health_pb2

from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime.grpc_utils import LIVENESS_SERVICE

logger = logging.getLogger(__name__)


class ReadinessMonitor:
    """Polls `model_info` (the router's GetModelInfo) every `interval_s` and calls `publish(ready)`
    whenever readiness changes; `paused()` (draining) stops it from declaring the gateway ready."""

    def __init__(
        self,
        model_info: Callable[[], Awaitable[moe_pb2.ModelInfo]],
        publish: Callable[[bool], Awaitable[None]],
        paused: Callable[[], bool],
        interval_s: float = 1.0,
    ) -> None:
        self._model_info, self._publish, self._paused, self.interval_s = model_info, publish, paused, interval_s
        self.ready: bool | None = None
        self.reason = "not checked yet"
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Ask the router now; publish a change; return whether the gateway can serve."""
        try:
            info = await self._model_info()
            ready, reason = info.ready, "" if info.ready else "an expert has no live replica"
        except aio.AioRpcError as error:
            ready, reason = False, f"the router is unreachable ({error.code().name}: {error.details()})"
        if self._paused():
            return False
        if ready != self.ready:
            if ready:
                logger.info("gateway ready: the router answers and every expert has a live replica")
            elif self.ready is not None:
                logger.warning("gateway NOT ready (health NOT_SERVING): %s", reason)
            self.ready, self.reason = ready, reason
            await self._publish(ready)
        return ready

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-readiness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # a monitor that dies would freeze readiness at its last value
                logger.exception("readiness check failed; trying again in %.1f s", self.interval_s)


class ReadinessHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose readiness answers (every service but liveness) come from a fresh check."""

    def __init__(self) -> None:
        super().__init__()
        self.monitor: ReadinessMonitor | None = None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext) -> object:
        if self.monitor is not None and request.service != LIVENESS_SERVICE:
            await self.monitor.check()  # one loopback call: a probe's answer is never stale
        return await super().Check(request, context)
