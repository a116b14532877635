"""Start a whole stack: expert workers as Ray actors, router and gateway as their own processes.

This is what `moe-serve up` runs and what the integration tests start, so the tests exercise the
same topology users get (and that the compose file describes): every service its own process,
talking gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.lifecycle import child_environment
from moe_serve.cluster.processes import ServiceProcess, spawn_service_process
from moe_serve.config import (
    SETTINGS_JSON_ENV,
    CommonSettings,
    ExpertComputeSettings,
    GatewayEndpointSettings,
    GatewaySettings,
    RouterPolicySettings,
    RouterSettings,
    UpSettings,
    WorkerPoolSettings,
    WorkerSettings,
    fields_of,
    settings_json,
)
from moe_serve.hub import checkpoint_name, portable_reference
from moe_serve.runtime.allocator import ray_worker_environment
from moe_serve.runtime.grpc_utils import advertised_host
from moe_serve.runtime.security import (
    CLUSTER_SECRET_ENV,
    ClusterCredentials,
    given_secret,
    new_cluster_secret,
    open_channel,
)
from moe_serve.worker_record import WorkerRecord

if TYPE_CHECKING:
    from moe_serve.cluster.reconcile import PlacementShape
    from moe_serve.model_spec import MoEModelSpec

logger = logging.getLogger(__name__)
CONTROLLER_MAX_RESTARTS = 5  # Ray counts them over the actor's lifetime; then `up` exits, naming it


def init_ray(address: str | None = None, **options: Any) -> Any:
    """Connect to the Ray cluster at `address`, or start a local one whose workers run at normal priority.

    Ray starts worker processes at niceness 15 by default; expert workers are the layer's compute,
    so a local cluster started here keeps them at 0 (a remote cluster keeps its own setting).
    The caller's SIGINT/SIGTERM handlers survive (ray.init replaces SIGTERM's).
    """
    import ray

    if address is None:
        os.environ.setdefault("RAY_worker_niceness", "0")
    # ray.init installs its own SIGTERM handler (sys.exit): keep the caller's, which drains first
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    context = ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **options)
    if threading.current_thread() is threading.main_thread():
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return context


@dataclass
class Stack:
    """A running stack; `stop()` shuts it down in reverse order (gateway first)."""

    model_name: str
    checkpoint: Path
    gateway: ServiceProcess
    router: ServiceProcess
    controller: Any  # a DeploymentController actor handle
    controller_name: str
    credentials: ClusterCredentials  # what internal calls to this stack need (tests, tools)

    @property
    def address(self) -> str:
        return self.gateway.address

    @property
    def http_address(self) -> str | None:
        """host:port of the gateway's KServe v2 REST endpoint (None when it serves gRPC only)."""
        return self.gateway.ready.get("http_address")

    @property
    def workers(self) -> list[WorkerRecord]:
        import ray

        return [WorkerRecord.from_json(text) for text in ray.get(self.controller.records.remote())]

    def metrics_addresses(self) -> dict[str, str]:
        """host:port of each Prometheus /metrics endpoint of the stack, by service (none when off)."""
        services = {"gateway": self.gateway.ready, "router": self.router.ready}
        if self.router.process is self.gateway.process:
            del services["router"]  # embedded: the gateway's endpoint serves the router's metrics
        found = {name: str(ready.get("metrics_address") or "") for name, ready in services.items()}
        found |= {record.worker_id: record.metrics_address for record in self.workers}
        return {name: address for name, address in found.items() if address}

    def stop(self) -> None:
        import ray

        self.gateway.stop()
        with contextlib.suppress(Exception):
            ray.get(self.controller.stop_all.remote(), timeout=120)
        with contextlib.suppress(Exception):
            ray.kill(self.controller)
        self.router.stop()


def with_cluster_secret(settings: UpSettings) -> UpSettings:
    """`settings` with a fresh cluster secret, unless one is given or internal security is off:
    every `moe-serve up` authenticates its internal hops with credentials of its own."""
    if given_secret(settings) or settings.cluster_secret_file or settings.insecure_internal:
        return settings
    return settings.model_copy(update={"cluster_secret": SecretStr(new_cluster_secret())})


def secret_environment(credentials: ClusterCredentials) -> dict[str, str]:
    """How children get the cluster secret: by environment, never on a command line (which any
    local user can read in the process list)."""
    return {} if credentials.secret is None else {CLUSTER_SECRET_ENV: credentials.secret.decode()}


def settings_environment(settings: CommonSettings) -> dict[str, str]:
    """How a child service gets its settings: every field as JSON in MOE_SERVE_SETTINGS_JSON (the
    cluster secret, left out, goes by secret_environment), never as flags on a command line."""
    return {SETTINGS_JSON_ENV: settings_json(settings)}


def gateway_settings(
    settings: UpSettings, checkpoint: Path, model_name: str, router_address: str = "", router_port: int | None = None
) -> GatewaySettings:
    """The gateway `up` starts: its common, gateway and router-policy settings; with `router_port`, the
    router runs inside it (on that port, with the checkpoint), else it calls the one at `router_address`."""
    shared = fields_of(settings, CommonSettings, GatewayEndpointSettings, RouterPolicySettings)
    if router_port is None:
        return GatewaySettings(**shared, router_address=router_address)
    return GatewaySettings(
        **shared, embedded_router=True, router_port=router_port, checkpoint=checkpoint, model_name=model_name
    )


def router_settings(settings: UpSettings, checkpoint: Path, model_name: str, port: int) -> RouterSettings:
    """The router service `up` starts (--router service): its common and router-policy settings."""
    return RouterSettings(
        **{
            **fields_of(settings, CommonSettings, RouterPolicySettings),
            "port": port,
            "checkpoint": checkpoint,
            "model_name": model_name,
            "metrics_port": 0,  # the gateway takes the configured metrics port; the router any free one
        }
    )


def worker_settings(
    settings: WorkerPoolSettings, checkpoint: Path, router_address: str, credentials: ClusterCredentials
) -> WorkerSettings:
    """What every worker actor of the pool starts with (the controller adds its experts and id).

    The common and expert-compute settings the pool was given (by flag or environment); those left at
    their defaults stay out, so that a worker on another Ray node still reads its own MOE_SERVE_*
    variables for them, as the raylet's environment there sets them."""
    shared = fields_of(settings, CommonSettings, ExpertComputeSettings)
    given = {name: value for name, value in shared.items() if name in settings.model_fields_set}
    return WorkerSettings(
        **{
            **given,
            "checkpoint": checkpoint,
            "router_address": None if settings.redis_url else router_address,
            # each worker actor picks a free metrics port and announces it in its registration
            "metrics": settings.metrics,
            "metrics_port": 0,
            # Ray keeps actor arguments in its control store, inside the cluster's trust boundary (a
            # process that can reach Ray can run code in any actor); never on a command line
            "cluster_secret": None if credentials.secret is None else SecretStr(credentials.secret.decode()),
            "insecure_internal": credentials.insecure,
        }
    )


def start_controller(
    settings: WorkerPoolSettings,
    checkpoint: Path,
    model_name: str,
    router_address: str,
    credentials: ClusterCredentials,
    while_starting: Callable[[], object] = lambda: None,
    *,
    worker_actor: type,
) -> tuple[Any, str]:
    """Create the deployment controller (a named Ray actor; Ray must be initialised) and its workers,
    instances of `worker_actor` (expert_service.actor.ExpertWorkerActor: the caller names the service).

    Returns the controller handle and its name once every worker registered; starts the balancer
    and autoscaling policies the settings ask for. `while_starting` runs while the workers start
    (waiting for the router they register with, say); if it raises, the controller is killed and its
    workers, which watch it, leave by themselves.
    """
    import ray

    from moe_serve.cluster.controller import NAMESPACE, DeploymentController, controller_name

    spec = Checkpoint(checkpoint).spec
    name = controller_name(model_name, router_address)
    policies = controller_policies(settings)
    controller = (
        ray.remote(DeploymentController)
        # restarted by Ray when its process dies; it then adopts its (detached) workers
        .options(name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=8, max_restarts=CONTROLLER_MAX_RESTARTS)
        .remote(
            model_name,
            # workers may start on other hosts: a Hub snapshot goes as its id pinned to the commit
            portable_reference(checkpoint),
            placement_shape(spec),
            worker_settings(settings, checkpoint, router_address, credentials),
            router_address,
            settings.worker_num_gpus,
            settings.worker_num_cpus,
            worker_environment(),
            policies,
            worker_actor=worker_actor,
        )
    )
    start_workers(controller, name, settings.workers, while_starting)
    return controller, name


def controller_policies(settings: WorkerPoolSettings) -> dict[str, Any] | None:
    """The rebalance and autoscale policies the settings ask for (None: neither). Given to the controller
    itself, so that a controller Ray restarts runs them again."""
    autoscale = autoscale_policy(settings)
    if settings.rebalance_interval_s or autoscale:
        return {"rebalance_interval_s": settings.rebalance_interval_s, "autoscale": autoscale}
    return None


def placement_shape(spec: MoEModelSpec) -> PlacementShape:
    """What the controller places: the MoE layers, the experts per layer, their groups and shared slots."""
    from moe_serve.cluster.reconcile import PlacementShape

    return PlacementShape(
        tuple(spec.moe_layers),
        spec.num_placed_experts,
        spec.routing.num_groups if spec.routing.num_groups > 1 else None,
        spec.num_shared_slots,
    )


def worker_environment() -> dict[str, str]:
    """The environment worker actors get from this process: telemetry and gRPC verbosity, plus Ray's."""
    return {
        **{key: value for key, value in os.environ.items() if key.startswith(("OTEL_", "GRPC_VERBOSITY"))},
        **ray_worker_environment(os.environ),
    }


def start_workers(controller: Any, name: str, workers: int, while_starting: Callable[[], object]) -> None:
    """Have the controller start `workers` workers and wait until they registered, running `while_starting`
    meanwhile; if anything fails, kill the controller and its workers, then raise."""
    import ray

    from moe_serve.cluster.controller import NAMESPACE, named_workers, worker_actor_name

    starting = controller.start.remote(workers)
    try:
        while_starting()
        ray.get(starting)
    except BaseException:
        ray.kill(controller)
        # its workers would leave by themselves once they miss it (expert_service.actor); now is sooner
        for worker_id in named_workers(name):
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(worker_actor_name(name, worker_id), namespace=NAMESPACE))
        raise


def autoscale_policy(settings: WorkerPoolSettings) -> dict[str, float] | None:
    if not settings.autoscale_max_workers:
        return None
    return {
        "target_queued_rows": settings.autoscale_target_queued_rows,
        "window": settings.autoscale_window,
        "minimum": settings.autoscale_min_workers or settings.workers,
        "maximum": settings.autoscale_max_workers,
    }


def launch_stack(
    settings: UpSettings,
    checkpoint: Path,
    router_port: int = 0,
    die_with_parent: bool = False,
    *,
    worker_actor: type,
) -> Stack:
    """Start the router (it hosts the registry unless Redis does), the gateway and the worker actors
    (through a deployment controller; Ray must be initialised) side by side; return once every expert
    has a replica and the gateway listens. With settings.router "embedded" the router runs inside
    the gateway. `worker_actor`: the expert worker's Ray actor class (expert_service.actor.ExpertWorkerActor).

    The router's address is known before it starts (a free port held by `reserve_port` until the
    router listens on it), so the workers and the gateway start while the router does: their start-up
    (imports, weights) overlaps instead of queueing behind the router's. The gateway reports not ready
    until the router does; the workers register the moment it listens.
    `die_with_parent`: the gateway and router get SIGTERM when this process dies (`moe-serve up`; the
    caller must be a thread that lives as long as the process, see moe_serve.cluster.lifecycle)."""
    spec = Checkpoint(checkpoint).spec
    model_name = settings.model_name or checkpoint_name(checkpoint)
    started = time.monotonic()
    settings = with_cluster_secret(settings)
    credentials = ClusterCredentials.from_settings(settings)  # ValueError: a secret too short, an unreadable file
    environment = {**secret_environment(credentials), **(child_environment() if die_with_parent else {})}
    embedded = settings.router == "embedded"
    reservation = reserve_port(settings.host) if router_port == 0 else None
    port = router_port if reservation is None else reservation.getsockname()[1]
    processes: list[ServiceProcess] = []
    controller: Any = None
    try:
        gateway, router_process, router_address = spawn_services(
            settings, checkpoint, model_name, port, environment, processes
        )
        controller, name = start_controller(
            settings,
            checkpoint,
            model_name,
            router_address,
            credentials,
            # a service that fails to start fails the launch at once, not after the workers' timeout
            while_starting=lambda: [process.wait_ready() for process in processes],
            worker_actor=worker_actor,
        )
        router = embedded_router_of(gateway) if router_process is None else router_process
        if router.address != router_address:
            raise RuntimeError(f"the router announced {router.address}; the workers were given {router_address}")
        wait_until_ready(router.address, credentials)
    except BaseException:
        stop_partial_stack(processes, controller)
        raise
    finally:
        if reservation is not None:
            reservation.close()
    logger.info(
        "stack for %s (%d MoE layers, %d experts; router %s) up in %.1f s",
        model_name,
        len(spec.moe_layers),
        spec.num_experts,
        "in the gateway" if embedded else "as its own process",
        time.monotonic() - started,
    )
    return Stack(
        model_name=model_name,
        checkpoint=checkpoint,
        gateway=gateway,
        router=router,
        controller=controller,
        controller_name=name,
        credentials=credentials,
    )


def spawn_services(
    settings: UpSettings,
    checkpoint: Path,
    model_name: str,
    port: int,
    environment: dict[str, str],
    processes: list[ServiceProcess],
) -> tuple[ServiceProcess, ServiceProcess | None, str]:
    """Spawn the router on `port` (inside the gateway when settings.router is "embedded"), then the gateway
    that calls it; each process goes into `processes` as soon as it is spawned, for the caller to stop on
    failure. Returns the gateway, the router's own process (None when embedded) and the router's address."""
    embedded = settings.router == "embedded"
    router_process: ServiceProcess | None = None
    if embedded:
        hosting = gateway_settings(settings, checkpoint, model_name, router_port=port)
        gateway = spawn_service_process("gateway", ["gateway"], {**environment, **settings_environment(hosting)})
        processes.append(gateway)
    else:
        routing = router_settings(settings, checkpoint, model_name, port)
        router_process = spawn_service_process("router", ["router"], {**environment, **settings_environment(routing)})
        processes.append(router_process)
    if port == 0:  # no port could be reserved: everything else waits for the one the router announces
        processes[0].wait_ready()
        router_address = (embedded_router_of(gateway) if router_process is None else router_process).address
    else:
        router_address = f"{advertised_host(settings.host, settings.advertise_host)}:{port}"
    if not embedded:
        calling = gateway_settings(settings, checkpoint, model_name, router_address=router_address)
        gateway = spawn_service_process("gateway", ["gateway"], {**environment, **settings_environment(calling)})
        processes.append(gateway)
    return gateway, router_process, router_address


def stop_partial_stack(processes: list[ServiceProcess], controller: Any) -> None:
    """Undo a launch that failed part way: stop the spawned services (last first), then the controller
    and its workers."""
    import ray

    for process in reversed(processes):
        process.stop(grace_s=2)
    if controller is not None:
        with contextlib.suppress(Exception):
            ray.get(controller.stop_all.remote(), timeout=60)
        ray.kill(controller)


def reserve_port(host: str) -> socket.socket | None:
    """A socket bound, not listening, to a free port of `host` with SO_REUSEPORT, so a port is known
    before the server that will listen on it starts: gRPC servers set SO_REUSEPORT too, and bind the
    port while this socket holds it; close it once the server listens. None where SO_REUSEPORT is
    missing or the host does not resolve (the caller then waits for the port the server announces)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return None
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host.strip("[]"), 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        reservation = socket.socket(family, kind, protocol)
    except OSError:
        return None
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(address)
    except OSError:
        reservation.close()
        return None
    return reservation


def embedded_router_of(gateway: ServiceProcess) -> ServiceProcess:
    """The router running inside `gateway`, as a service of its own: same process, the router's address."""
    return ServiceProcess(
        name="router (in the gateway)",
        process=gateway.process,
        ready={**gateway.ready, "address": gateway.ready["router_address"]},
        recent_output=gateway.recent_output,
        announced=gateway.announced,
    )


def wait_until_ready(router_address: str, credentials: ClusterCredentials, timeout_s: float = 60.0) -> None:
    """Block until the router reports a live replica for every expert."""
    from moe_serve.protos import moe_serve_pb2 as moe_pb2
    from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc

    deadline = time.monotonic() + timeout_s
    with open_channel(router_address, [], credentials) as channel:
        stub = moe_grpc.RouterStub(channel)
        while not stub.GetModelInfo(moe_pb2.ModelInfoRequest(), timeout=5).ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {router_address} not ready within {timeout_s:.0f} s")
            time.sleep(0.05)
