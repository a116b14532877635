"""Commands that run one service: `moe-serve gateway`, `router`, `worker`.

Their flags are the fields of GatewaySettings, RouterSettings and WorkerSettings (settings_options).
"""

from __future__ import annotations

from moe_serve.cli.commands.common import (
    app,
    run_service,
    settings_options,
)
from moe_serve.config import GatewaySettings, RouterSettings, WorkerSettings
from moe_serve.runtime.grpc_utils import configure_logging


@app.command(rich_help_panel="Run one service")
@settings_options(GatewaySettings)
def gateway(settings: GatewaySettings) -> None:
    """Run the gateway: the public KServe v2 endpoint, admission, capacity policy, combine."""
    from gateway.server import GatewayService

    configure_logging(settings.log_level, settings.log_format)
    run_service(GatewayService.serve(settings), settings.event_loop)


@app.command(rich_help_panel="Run one service")
@settings_options(RouterSettings)
def router(settings: RouterSettings) -> None:
    """Run the router: gating, capacity, replica choice, fan-out to the expert workers."""
    from router_service.server import RouterService

    configure_logging(settings.log_level, settings.log_format)
    run_service(RouterService.serve(settings), settings.event_loop)


@app.command(rich_help_panel="Run one service")
@settings_options(WorkerSettings)
def worker(settings: WorkerSettings) -> None:
    """Run one expert worker process (no Ray): load its experts, serve them, register in Redis."""
    from expert_service.server import WorkerService

    configure_logging(settings.log_level, settings.log_format)
    run_service(WorkerService.serve(settings), settings.event_loop)
