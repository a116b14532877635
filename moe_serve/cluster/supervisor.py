"""`moe-serve up` watches the service processes it started and restarts one that dies.

A dead gateway or router is started again the way it was first started, on the ports it had (so
clients, the gateway's router channel and the workers' registrations find it where they left it;
workers re-register on their next heartbeat), after a backoff that doubles with each restart. A
restart budget bounds it: more than `limit` restarts of one service within `window_s` means the
service cannot stay up, and `up` gives up loudly (exit code 1, naming it) rather than keep a
stack that does not serve. While a service is down its port is closed (the gateway) or the
gateway's readiness is NOT_SERVING (the router), so load balancers take the stack out meanwhile.

`poll()` is called from `up`'s main thread: the children get the kernel's parent-death signal
when the thread that started them ends (moe_serve.cluster.lifecycle), so they are started from the one
thread that lives as long as `up`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_serve.cluster.processes import ServiceProcess, spawn_service_process
from moe_serve.config import SETTINGS_JSON_ENV

logger = logging.getLogger(__name__)

# flags whose value (a port, 0 = any free one) is pinned to the port the first process bound
PORT_FLAGS = {"--port": "address", "--router-port": "router_address", "--http-port": "http_address"}
# the same, for a service started with its settings in MOE_SERVE_SETTINGS_JSON (launcher.settings_environment)
PORT_SETTINGS = {"port": "address", "router_port": "router_address", "http_port": "http_address"}


class ServiceFailed(RuntimeError):
    """A supervised service died more often than its restart budget allows."""


@dataclass(frozen=True)
class RestartPolicy:
    limit: int = 5  # restarts allowed within window_s; one more and `up` gives up
    window_s: float = 300.0
    first_backoff_s: float = 0.5  # doubled for each restart still within the window
    max_backoff_s: float = 10.0

    def backoff_s(self, recent_restarts: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2**recent_restarts)


def pinned_arguments(service: ServiceProcess) -> list[str]:
    """The service's arguments with each port flag set to the port it announced it listens on."""
    args = list(service.args)
    for index, flag in enumerate(args[:-1]):
        announced = service.ready.get(PORT_FLAGS.get(flag, ""))
        if announced:
            args[index + 1] = str(announced).rsplit(":", 1)[1]
    return args


def pinned_environment(service: ServiceProcess) -> dict[str, str]:
    """The service's environment with each port of its settings JSON set to the port it announced."""
    env = dict(service.env)
    if SETTINGS_JSON_ENV not in env:
        return env
    settings = json.loads(env[SETTINGS_JSON_ENV])
    for name, ready_key in PORT_SETTINGS.items():
        announced = service.ready.get(ready_key)
        if announced and name in settings:
            settings[name] = int(str(announced).rsplit(":", 1)[1])
    return {**env, SETTINGS_JSON_ENV: json.dumps(settings)}


class SupervisedService:
    """One service process and its restarts; `poll()` advances it (running → waiting → starting)."""

    def __init__(
        self,
        service: ServiceProcess,
        policy: RestartPolicy,
        on_restarted: Callable[[ServiceProcess], None] = lambda _: None,
    ) -> None:
        self.current = service
        self.policy = policy
        self.on_restarted = on_restarted  # told of the new process once it is ready
        self._arguments = pinned_arguments(service)
        self._environment = pinned_environment(service)
        self._restarts: deque[float] = deque()  # monotonic times of the restarts within the window
        self._restart_at: float | None = None  # while waiting out the backoff
        self._starting: ServiceProcess | None = None
        self.last_exit_code: int | None = None

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def healthy(self) -> bool:
        return self._restart_at is None and self._starting is None and self.current.process.poll() is None

    def stop_replacement(self) -> None:
        """Stop a replacement still starting (at shutdown; the current process is the stack's to stop)."""
        if self._starting is not None:
            self._starting.stop(grace_s=2)
            self._starting = None

    def poll(self, now: float | None = None) -> None:
        """Notice a death, start the replacement when its backoff is over, adopt it once ready.
        Raises ServiceFailed once the restart budget is spent."""
        now = time.monotonic() if now is None else now
        if self._starting is not None:
            self._check_starting(now)
        elif self._restart_at is not None:
            if now >= self._restart_at:
                self._restart_at = None
                self._starting = spawn_service_process(
                    self.current.name, self._arguments, self._environment, self.current.module
                )
        elif (code := self.current.process.poll()) is not None:
            self._died(code, now, "")

    def _check_starting(self, now: float) -> None:
        assert self._starting is not None
        code = self._starting.process.poll()
        if self._starting.announced.is_set() and self._starting.ready and code is None:
            self.current, self._starting = self._starting, None
            logger.warning("%s restarted: ready again at %s", self.name, self.current.address)
            self.on_restarted(self.current)
        elif code is not None:
            tail = "\n".join(self._starting.recent_output)
            self._starting = None
            self._died(code, now, f" while starting again; its last output:\n{tail}")

    def _died(self, code: int, now: float, detail: str) -> None:
        self.last_exit_code = code
        while self._restarts and now - self._restarts[0] > self.policy.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.policy.limit:
            raise ServiceFailed(
                f"{self.name} died (exit code {code}) after {len(self._restarts)} restarts within "
                f"{self.policy.window_s:.0f} s; giving up{detail}"
            )
        backoff = self.policy.backoff_s(len(self._restarts))
        self._restarts.append(now)
        self._restart_at = now + backoff
        logger.warning(
            "%s died (exit code %d)%s; restarting in %.1f s (restart %d of at most %d within %.0f s)",
            self.name,
            code,
            detail,
            backoff,
            len(self._restarts),
            self.policy.limit,
            self.policy.window_s,
        )


class SupervisedActor:
    """A named Ray actor that Ray restarts itself (`max_restarts`): this only notices when Ray gave
    up, i.e. its name is gone, and then raises ServiceFailed. Pings it without blocking `poll()`."""

    def __init__(self, name: str, handle: Any, actor_name: str, namespace: str, interval_s: float = 2.0) -> None:
        self.name, self.handle, self.actor_name, self.namespace = name, handle, actor_name, namespace
        self.interval_s = interval_s
        self._pending: Any = None  # the ObjectRef of the ping in flight
        self._next_ping = 0.0

    def stop_replacement(self) -> None:
        """Nothing to stop: Ray starts the replacement."""

    def poll(self, now: float | None = None) -> None:
        import ray

        now = time.monotonic() if now is None else now
        if self._pending is None:
            if now >= self._next_ping:
                self._pending = self.handle.__ray_ready__.remote()
            return
        done, _ = ray.wait([self._pending], timeout=0)
        if not done:
            return  # busy, or being restarted: a ping waits for the restarted actor
        ping, self._pending, self._next_ping = self._pending, None, now + self.interval_s
        try:
            ray.get(ping)
        except ray.exceptions.RayActorError as error:
            try:
                ray.get_actor(self.actor_name, namespace=self.namespace)  # still named: Ray restarts it
            except ValueError:
                raise ServiceFailed(f"the {self.name} died and Ray will not restart it again ({error})") from None
            logger.warning("the %s died; Ray is restarting it (%s)", self.name, type(error).__name__)
