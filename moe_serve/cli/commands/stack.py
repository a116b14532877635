"""Commands for a whole stack on a Ray cluster: `moe-serve up`, `workers`, `scale`, `status`, `top`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moe_serve.cli.cluster_commands import DEFAULT_SCALE_TIMEOUT_S, DEFAULT_TIMEOUT_S, NoAnswer, connect, print_status
from moe_serve.cli.commands.common import (
    ClusterSecretFile,
    InsecureInternal,
    InternalTlsCa,
    InternalTlsCert,
    InternalTlsKey,
    app,
    configuration_errors_reported,
    console,
    settings_options,
    tool_credentials,
)
from moe_serve.config import UpSettings, WorkersSettings
from moe_serve.runtime.grpc_utils import configure_logging


@app.command(rich_help_panel="Run and scale a stack")
@settings_options(UpSettings)
def up(settings: UpSettings) -> None:
    """Start router (inside the gateway unless --router service), expert workers and gateway; block until
    Ctrl-C or SIGTERM, then stop them all."""
    from moe_serve.cli.stack_command import run_up

    configure_logging(settings.log_level, settings.log_format)
    with configuration_errors_reported():
        run_up(settings, console)


@app.command(rich_help_panel="Run and scale a stack")
@settings_options(WorkersSettings)
def workers(settings: WorkersSettings) -> None:
    """Deploy the expert-worker actors of a stack on a Ray cluster (router and gateway run elsewhere)."""
    from moe_serve.cli.stack_command import run_workers

    configure_logging(settings.log_level, settings.log_format)
    with configuration_errors_reported():
        run_workers(settings, console)


ClusterFile = Annotated[Path, typer.Option(help="Cluster file written by `moe-serve up`.")]
ControllerName = Annotated[str | None, typer.Option(help="Controller actor name (default: from the cluster file).")]
RayAddress = Annotated[str | None, typer.Option(help="Ray cluster address (default: from the cluster file).")]
RayTimeout = Annotated[
    float, typer.Option("--timeout", help="Seconds to wait for the Ray cluster and for each answer of the controller.")
]


@app.command(rich_help_panel="Run and scale a stack")
def scale(
    expert: Annotated[int | None, typer.Option(help="Expert to give --replicas replicas.")] = None,
    layer: Annotated[int | None, typer.Option(help="Only this MoE layer's expert (default: every layer).")] = None,
    replicas: Annotated[int | None, typer.Option(help="Replicas wanted for --expert.")] = None,
    workers: Annotated[int | None, typer.Option(help="Re-place all experts over this many workers.")] = None,
    cluster_file: ClusterFile = Path(".moe-serve/cluster.json"),
    ray_address: RayAddress = None,
    controller: ControllerName = None,
    timeout: RayTimeout = DEFAULT_TIMEOUT_S,
    scale_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the change itself (new workers start and load experts).")
    ] = DEFAULT_SCALE_TIMEOUT_S,
) -> None:
    """Scale the running stack: one expert's replicas, or the number of workers (never failing a request)."""
    if (expert is None) == (workers is None) or (expert is not None and replicas is None):
        console.print("[red]error[/red]: give either --expert E --replicas N [--layer L], or --workers N")
        raise typer.Exit(2)
    with _reported_failures():
        handle = connect(cluster_file, ray_address, controller, timeout)
        import ray  # after connect(), which sets up Ray's authentication mode first

        try:
            if workers is not None:
                handle.ask("scale_workers", workers, timeout_s=scale_timeout)
            else:
                handle.ask("scale_expert", expert, replicas, layer, timeout_s=scale_timeout)
        except ray.exceptions.RayTaskError as error:
            console.print(f"[red]error[/red]: {error.cause}")
            raise typer.Exit(1) from None
        except NoAnswer as error:
            raise NoAnswer(f"{error} The change may still be under way: see `moe-serve status`.") from None
        current = handle.ask("status")
    print_status(Console(), current)


@app.command(rich_help_panel="Run and scale a stack")
def status(
    cluster_file: ClusterFile = Path(".moe-serve/cluster.json"),
    ray_address: RayAddress = None,
    controller: ControllerName = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON (for scripts).")] = False,
    timeout: RayTimeout = DEFAULT_TIMEOUT_S,
) -> None:
    """Print the placement table of the running stack: workers, nodes, GPUs, experts, replicas, live load."""
    with _reported_failures():
        current = connect(cluster_file, ray_address, controller, timeout).ask("status")
    if as_json:
        print(json.dumps({**current, "workers": [json.loads(w) for w in current["workers"]]}, indent=2))
    else:
        print_status(Console(), current)


@contextlib.contextmanager
def _reported_failures() -> Iterator[None]:
    """A missing cluster file, an unknown controller, a cluster that does not answer: a message and
    exit status 1, not a stack trace."""
    try:
        yield
    except (FileNotFoundError, ValueError, ConnectionError, NoAnswer) as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None


@app.command(rich_help_panel="Run and scale a stack")
def top(
    redis_url: Annotated[str | None, typer.Option(help="Read the live state the gateway writes to this Redis.")] = None,
    redis_prefix: Annotated[str, typer.Option(help="Key prefix in Redis.")] = "moe-serve:",
    model: Annotated[str | None, typer.Option(help="Model whose live state to show (with --redis-url).")] = None,
    gateway_admin: Annotated[
        str | None, typer.Option(help="Or ask the gateway directly: host:port of its internal (delivery) port.")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print the view once and exit.")] = False,
    cluster_file: ClusterFile = Path(".moe-serve/cluster.json"),
    internal_tls_ca: InternalTlsCa = None,
    internal_tls_cert: InternalTlsCert = None,
    internal_tls_key: InternalTlsKey = None,
    cluster_secret_file: ClusterSecretFile = None,
    insecure_internal: InsecureInternal = None,
) -> None:
    """Live view of a running stack: latency, throughput, workers and their load, per-expert load bars.

    The gateway's internal port needs the stack's cluster secret: MOE_SERVE_CLUSTER_SECRET,
    --cluster-secret-file, or the file `moe-serve up` names in its cluster file."""
    from moe_serve.cli.top import gateway_source, redis_source, render, run_top
    from moe_serve.runtime.security import INSECURE_INTERNAL

    if (redis_url is None) == (gateway_admin is None) or (redis_url is not None and model is None):
        console.print("[red]error[/red]: give either --redis-url URL --model NAME, or --gateway-admin HOST:PORT")
        raise typer.Exit(2)
    if gateway_admin:
        credentials = (
            INSECURE_INTERNAL
            if insecure_internal
            else tool_credentials(
                internal_tls_ca, internal_tls_cert, internal_tls_key, cluster_secret_file, cluster_file
            )
        )
        source = gateway_source(gateway_admin, credentials)
    else:
        source = redis_source(redis_url, redis_prefix, model)
    if once:
        Console().print(render(source()))
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_top(source, Console(), interval)
