"""`moe-serve up` (the whole stack) and `moe-serve workers` (the worker actors of a stack whose router and
gateway run elsewhere, as in docker compose): start, print the endpoint, block until told to stop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moe_serve.cluster_commands import ClusterInfo
from moe_serve.config import UpSettings, WorkersSettings
from moe_serve.controller import NAMESPACE
from moe_serve.demo import ensure_demo_checkpoint
from moe_serve.errors import ConfigurationError
from moe_serve.grpc_utils import announce_ready
from moe_serve.launcher import Stack, init_ray, launch_stack, start_controller, with_cluster_secret
from moe_serve.security import ClusterCredentials, write_secret_file


def resolve_checkpoint(settings: UpSettings, console: Console) -> Path:
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
    import ray

    settings = with_cluster_secret(settings)
    internal_credentials(settings)  # a bad secret stops here, before Ray starts
    checkpoint = resolve_checkpoint(settings, console)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    init_ray(settings.ray_address)
    secret_file = ""
    try:
        stack = launch_stack(settings, checkpoint)
        try:
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
            stop.wait()
            console.print("stopping ...")
        finally:
            stack.stop()
            if secret_file:
                Path(secret_file).unlink(missing_ok=True)
    finally:
        ray.shutdown()


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
        model_name = settings.model_name or settings.checkpoint.resolve().name
        controller, name = start_controller(
            settings, settings.checkpoint, model_name, settings.router_address, credentials
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
