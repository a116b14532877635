"""What every `moe-serve` command shares: the Typer app, the console, option types, settings building.

Every flag has an environment variable twin with the MOE_SERVE_ prefix (e.g. --redis-url and
MOE_SERVE_REDIS_URL); a flag given on the command line wins.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from moe_serve.errors import ConfigurationError

app = typer.Typer(
    name="moe-serve",
    help="Distributed serving of Mixture-of-Experts layers over gRPC (KServe v2 API).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
SettingsT = TypeVar("SettingsT", bound=BaseModel)

# options shared by the service commands
Host = Annotated[str | None, typer.Option(help="Interface to bind (0.0.0.0 for remote callers).")]
AdvertiseHost = Annotated[str | None, typer.Option(help="Host name other services dial to reach this one.")]
RedisUrl = Annotated[str | None, typer.Option(help="Redis URL of the shared worker registry.")]
RedisPrefix = Annotated[str | None, typer.Option(help="Key prefix in Redis.")]
RegistryTtl = Annotated[
    float | None, typer.Option("--registry-ttl", help="Seconds a registration lives without heartbeat.")
]
LogLevel = Annotated[str | None, typer.Option(help="Logging level (DEBUG, INFO, WARNING).")]
MaxMessageBytes = Annotated[int | None, typer.Option(help="Largest gRPC message on every hop, in bytes.")]
Dtype = Annotated[str | None, typer.Option(help="Compute dtype: auto (the checkpoint's), float32, bfloat16, float16.")]
ModelName = Annotated[str | None, typer.Option(help="Public model name (default: checkpoint directory name).")]
CheckpointDir = Annotated[Path | None, typer.Option(help="Hugging Face checkpoint directory (safetensors).")]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        help="Serve Prometheus metrics on this port (0 = any free); OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set."
    ),
]
CapacityFactor = Annotated[
    float | None,
    typer.Option(
        help="Expert capacity factor C = ceil(f*T*k/E); unset: the "
        "model's own behaviour (dropless, Switch: its capacity)."
    ),
]
Overflow = Annotated[str | None, typer.Option(help="Over capacity: drop, reroute or dropless.")]
BatchWindow = Annotated[float | None, typer.Option(help="Cross-request batching window in ms (0 = off).")]


def build_settings(settings_class: type[SettingsT], **flags: Any) -> SettingsT:
    """Settings from the environment, overridden by the flags that were given."""
    try:
        return settings_class(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "settings"
            console.print(f"[red]invalid {field}[/red]: {problem['msg']}")
        raise typer.Exit(2) from None


def run_service(coroutine: Any) -> None:
    try:
        asyncio.run(coroutine)
    except ConfigurationError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None
