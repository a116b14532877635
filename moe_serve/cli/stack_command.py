"""`moe-serve up` (the whole stack) and `moe-serve workers` (the worker actors of a stack whose router and
gateway run elsewhere, as in docker compose): start, print the endpoint, block until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from expert_service.actor import ExpertWorkerActor
from moe_serve.cli.cluster_commands import ClusterInfo
from moe_serve.cli.demo import ensure_demo_checkpoint
from moe_serve.cluster.controller import NAMESPACE
from moe_serve.cluster.launcher import (
    Stack,
    embedded_router_of,
    init_ray,
    launch_stack,
    start_controller,
    with_cluster_secret,
)
from moe_serve.cluster.lifecycle import start_watchdog
from moe_serve.cluster.processes import ServiceProcess
from moe_serve.cluster.supervisor import RestartPolicy, ServiceFailed, SupervisedActor, SupervisedService
from moe_serve.config import UpSettings, WorkersSettings
from moe_serve.hub import checkpoint_name
from moe_serve.runtime.errors import ConfigurationError
from moe_serve.runtime.grpc_utils import announce_ready
from moe_serve.runtime.security import ClusterCredentials, write_secret_file

logger = logging.getLogger(__name__)
SUPERVISION_INTERVAL_S = 0.5


def checkpoint_or_demo(settings: UpSettings, console: Console) -> Path:
    if settings.checkpoint is not None:
        return settings.checkpoint
    path = ensure_demo_checkpoint(settings.demo_dir)
    console.print(f"no --checkpoint given: serving the demo checkpoint at {path}")
    return path


def describe(stack: Stack) -> Table:
    table = Table(title=f"moe-serve: model {stack.model_name!r} at {stack.address}")
    for column in ("worker", "address", "node", "GPU", "experts"):
        table.add_column(column)
    for record in stack.workers:
        experts = sorted({key.expert for key in record.experts})
        table.add_row(
            record.worker_id, record.address, record.node_id[:12], str(record.gpu_id), ", ".join(map(str, experts))
        )
    return table


def run_up(settings: UpSettings, console: Console) -> None:
    """Start the stack, supervise it until SIGINT/SIGTERM, stop it within settings.stop_timeout_s.

    Exits 1 (SystemExit) when a service dies more often than its restart budget allows."""
    import ray

    settings = with_cluster_secret(settings)
    internal_credentials(settings)  # a bad secret stops here, before Ray starts
    checkpoint = checkpoint_or_demo(settings, console)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    start_watchdog()  # before Ray starts: it records Ray's processes too, and stops them if `up` dies hard
    init_ray(settings.ray_address)
    stack: Stack | None = None
    services: list[SupervisedService | SupervisedActor] = []
    secret_file = ""
    failure: ServiceFailed | None = None
    try:
        stack = launch_stack(settings, checkpoint, die_with_parent=True, worker_actor=ExpertWorkerActor)
        console.print(describe(stack))
        rest = f", REST http://{stack.http_address}/v2" if stack.http_address else ""
        console.print(
            f"[green]ready[/green]: KServe v2 gRPC endpoint {stack.address}{rest}, model "
            f"{stack.model_name!r} (router {stack.router.address}); Ctrl-C to stop"
        )
        metrics = stack.metrics_addresses()
        for name, address in metrics.items():
            console.print(f"metrics: {name} http://{address}/metrics")
        secret_file = _write_secret(stack.credentials, settings.cluster_file)
        ClusterInfo(
            ray_address=ray.get_runtime_context().gcs_address,
            controller=stack.controller_name,
            namespace=NAMESPACE,
            gateway=stack.address,
            router=stack.router.address,
            model=stack.model_name,
            secret_file=secret_file,
        ).write(settings.cluster_file)
        announce_ready(
            "stack",
            address=stack.address,
            http_address=stack.http_address,
            model=stack.model_name,
            router=stack.router.address,
            cluster_file=str(settings.cluster_file),
            metrics=metrics,
        )
        services = supervise(stack, RestartPolicy(settings.restart_limit, settings.restart_window_s))
        failure = _supervise_until(stop, services)
        console.print(f"[red]error[/red]: {failure}; stopping" if failure else "stopping ...")
    finally:
        ray_lost = _local_ray_lost()
        stopped = _run_bounded(lambda: _stop(stack, services, secret_file, ray_lost), settings.stop_timeout_s)
        if ray_lost or not stopped:
            # any call into a Ray that lost its processes can hang, its exit hook included
            if not stopped:
                logger.warning(
                    "the stack did not stop within %.0f s; the watchdog stops the rest", settings.stop_timeout_s
                )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1 if failure or sys.exc_info()[0] is not None else 0)  # an error on the way counts
    if failure:
        raise SystemExit(1)


def supervise(stack: Stack, policy: RestartPolicy) -> list[SupervisedService | SupervisedActor]:
    """Watch the gateway (which hosts the router when embedded), a router process of its own, and the
    deployment controller (Ray restarts it and the workers; this notices when Ray gives up)."""

    embedded = stack.router.process is stack.gateway.process

    def gateway_restarted(gateway: ServiceProcess) -> None:
        stack.gateway = gateway
        if embedded:
            stack.router = embedded_router_of(gateway)

    def router_restarted(router: ServiceProcess) -> None:
        stack.router = router

    services: list[SupervisedService | SupervisedActor] = [
        SupervisedService(stack.gateway, policy, gateway_restarted),
        SupervisedActor("deployment controller", stack.controller, stack.controller_name, NAMESPACE),
    ]
    if not embedded:
        services.append(SupervisedService(stack.router, policy, router_restarted))
    return services


def _supervise_until(
    stop: threading.Event, services: list[SupervisedService | SupervisedActor]
) -> ServiceFailed | None:
    """Poll the services (restarting dead ones) until `stop` is set; the failure that ends it, if any.
    Runs on the main thread, the one that started the children (see moe_serve.cluster.supervisor)."""
    while not stop.wait(SUPERVISION_INTERVAL_S):
        for service in services:
            try:
                service.poll()
            except ServiceFailed as failure:
                if stop.is_set():  # a group signal stops children and `up` at once: no failure, a stop
                    return None
                logger.error("%s", failure)
                return failure
            if stop.is_set():
                return None
    return None


def _stop(
    stack: Stack | None, services: list[SupervisedService | SupervisedActor], secret_file: str, ray_lost: bool
) -> None:
    """Stop the stack in order; when Ray lost its processes, only the gateway and router (the
    watchdog stops what is left of Ray once `up` exits)."""
    import ray

    for service in services:
        service.stop_replacement()
    if stack is not None and ray_lost:
        logger.warning("Ray's own processes are going down (a signal to the whole group?): not draining the workers")
        stack.gateway.stop()
        stack.router.stop()
    elif stack is not None:
        stack.stop()
    if secret_file:
        Path(secret_file).unlink(missing_ok=True)
    if not ray_lost:
        ray.shutdown()


def _local_ray_lost(wait_s: float = 0.3) -> bool:
    """Whether a process of the local Ray instance `up` started has ended (never for a remote cluster).

    A signal to the whole process group reaches Ray's GCS and raylet as well as `up`; waits a moment
    first, since `up`'s handler usually runs before they have finished exiting."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # set only for a local instance
    if node is None:
        return False
    time.sleep(wait_s)
    try:
        return bool(node.dead_processes())
    except Exception:  # a private interface: without it, the bounded stop still ends `up`
        return False


def _run_bounded(action: Callable[[], None], timeout_s: float) -> bool:
    """Run `action` on a daemon thread; True if it finished (raising or not) within `timeout_s`."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # reported below; the caller's own exit matters more
            errors.append(error)

    thread = threading.Thread(target=run, name="stack-stop", daemon=True)
    thread.start()
    thread.join(timeout_s)
    for error in errors:
        logger.warning("stopping the stack: %s", error)
    return not thread.is_alive()


def internal_credentials(settings: WorkersSettings | UpSettings) -> ClusterCredentials:
    try:
        return ClusterCredentials.from_settings(settings)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None


def _write_secret(credentials: ClusterCredentials, cluster_file: Path) -> str:
    """Keep the stack's cluster secret beside its cluster file (mode 0600) for `moe-serve top`;
    removed when the stack stops."""
    if credentials.secret is None:
        return ""
    return str(write_secret_file(cluster_file.with_suffix(".secret"), credentials.secret.decode()).resolve())


def run_workers(settings: WorkersSettings, console: Console) -> None:
    """`moe-serve workers`: the deployment controller and its worker actors, until SIGINT/SIGTERM."""
    import ray

    credentials = internal_credentials(settings)  # the router's stack's secret: it runs elsewhere
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    init_ray(settings.ray_address)
    try:
        model_name = settings.model_name or checkpoint_name(settings.checkpoint)
        controller, name = start_controller(
            settings,
            settings.checkpoint,
            model_name,
            settings.router_address,
            credentials,
            worker_actor=ExpertWorkerActor,
        )
        console.print(
            f"[green]ready[/green]: {settings.workers} worker(s) of {model_name!r} registered with "
            f"router {settings.router_address}; controller {name!r}"
        )
        ray_address = ray.get_runtime_context().gcs_address
        # `moe-serve scale` / `status` run where this runs (e.g. `docker compose exec workers ...`) need no flags
        ClusterInfo(
            ray_address=ray_address,
            controller=name,
            namespace=NAMESPACE,
            gateway="",
            router=settings.router_address,
            model=model_name,
        ).write(settings.cluster_file)
        announce_ready("workers", controller=name, ray_address=ray_address, cluster_file=str(settings.cluster_file))
        stop.wait()
        ray.get(controller.stop_all.remote(), timeout=120)
    finally:
        ray.shutdown()
