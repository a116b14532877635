"""What every `moe-serve` command shares: the Typer app, the console, option types, settings building.

Every flag has an environment variable twin with the MOE_SERVE_ prefix (e.g. --redis-url and
MOE_SERVE_REDIS_URL); a flag given on the command line wins.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from moe_serve.runtime import eventloop
from moe_serve.runtime.errors import ConfigurationError
from moe_serve.runtime.eventloop import EventLoopName

app = typer.Typer(
    name="moe-serve",
    help="Distributed serving of Mixture-of-Experts layers over gRPC (KServe v2 API).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
SettingsT = TypeVar("SettingsT", bound=BaseModel)
DISTRIBUTION = "moe-serve"


def _print_version(value: bool) -> None:
    if value:
        # the installed distribution's version, the one `pip show moe-serve` reports
        typer.echo(f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Distributed serving of Mixture-of-Experts layers over gRPC (KServe v2 API)."""


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Exit 2 with a one-line hint when a module of an optional extra is not installed.

    Checked up front (find_spec imports nothing) so that a missing extra reads as what to install,
    not as a ModuleNotFoundError traceback minutes into a run.
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        console.print(
            f"moe-serve {command} needs the {extra} extra (missing: {', '.join(missing)}): "
            f"pip install 'moe-serve[{extra}]'",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)


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
ModelName = Annotated[
    str | None, typer.Option(help="Public model name (default: the checkpoint directory's or Hub repository's name).")
]
CheckpointDir = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face checkpoint: a directory (safetensors), or a Hub id org/name[@revision] fetched into the "
        "Hugging Face cache (config.json and safetensors only; HF_HOME, HF_HUB_OFFLINE apply)."
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        help="Prometheus /metrics port (defaults: gateway and up 8002, router 8012, worker 8022; 0 = any free); "
        "OTLP too when OTEL_EXPORTER_OTLP_ENDPOINT is set."
    ),
]
Metrics = Annotated[
    bool | None, typer.Option("--metrics/--no-metrics", help="Serve Prometheus /metrics (on by default).")
]
LogFormat = Annotated[str | None, typer.Option(help="Log lines as text (default) or json (one object per line).")]
CapacityFactor = Annotated[
    float | None,
    typer.Option(
        help="Expert capacity factor C = ceil(f*T*k/E); unset: the "
        "model's own behaviour (dropless, Switch: its capacity)."
    ),
]
Overflow = Annotated[str | None, typer.Option(help="Over capacity: drop, reroute or dropless.")]
BatchWindow = Annotated[float | None, typer.Option(help="Cross-request batching window in ms (0 = off).")]
PipelineChunk = Annotated[
    int | None,
    typer.Option(help="Route requests longer than this as concurrent chunks of at most this many tokens (0 = off)."),
]

HttpPort = Annotated[int | None, typer.Option(help="KServe v2 HTTP/REST port of the gateway (0 = any free).")]
ServeHttp = Annotated[
    bool | None, typer.Option("--http/--no-http", help="Serve KServe v2 HTTP/REST beside gRPC (default: on).")
]

# these three also read their MOE_SERVE_ variables in client commands (health, top), so container
# health checks of internal services work unchanged when mutual TLS is switched on by environment
InternalTlsCa = Annotated[
    Path | None,
    typer.Option(
        envvar="MOE_SERVE_INTERNAL_TLS_CA", help="Mutual TLS between services: the internal CA certificate (PEM)."
    ),
]
InternalTlsCert = Annotated[
    Path | None, typer.Option(envvar="MOE_SERVE_INTERNAL_TLS_CERT", help="This service's internal certificate (PEM).")
]
InternalTlsKey = Annotated[
    Path | None,
    typer.Option(envvar="MOE_SERVE_INTERNAL_TLS_KEY", help="Private key of the internal certificate (PEM)."),
]
ClusterSecretFile = Annotated[
    Path | None,
    typer.Option(
        envvar="MOE_SERVE_CLUSTER_SECRET_FILE",
        help="File (mode 0600) holding the stack's cluster secret, which authenticates every internal call "
        "(or set MOE_SERVE_CLUSTER_SECRET; `moe-serve up` makes its own).",
    ),
]
InsecureInternal = Annotated[
    bool | None,
    typer.Option(
        "--insecure-internal",
        help="Debugging only: internal RPCs accept any caller, registry records are not authenticated.",
    ),
]
TlsCert = Annotated[Path | None, typer.Option(help="TLS on the public port: certificate chain (PEM).")]
TlsKey = Annotated[Path | None, typer.Option(help="TLS on the public port: private key (PEM).")]
TlsClientCa = Annotated[
    Path | None, typer.Option(help="Require client certificates signed by this CA on the public port.")
]
AuthTokensFile = Annotated[
    Path | None, typer.Option(help="Bearer-token auth: JSON file of tokens and the models each may use.")
]
DeviceMemoryBudget = Annotated[
    str | None,
    typer.Option(
        help="Expert offloading: bytes of experts on the compute device ('512MiB', '2GB') or a fraction of "
        "the owned experts ('0.25'); the rest wait in host memory. Unset: all resident."
    ),
]
EvictionPolicy = Annotated[str | None, typer.Option(help="Offloading: lru or lfu (over --lfu-window seconds).")]


def internal_security_flags(
    ca: Path | None, cert: Path | None, key: Path | None, secret_file: Path | None, insecure: bool | None
) -> dict[str, Any]:
    return {
        "internal_tls_ca": ca,
        "internal_tls_cert": cert,
        "internal_tls_key": key,
        "cluster_secret_file": secret_file,
        "insecure_internal": insecure,
    }


def tool_credentials(
    ca: Path | None, cert: Path | None, key: Path | None, secret_file: Path | None, cluster_file: Path
) -> Any:
    """Credentials of a command-line tool calling internal services: the secret from
    MOE_SERVE_CLUSTER_SECRET, --cluster-secret-file, or the stack's cluster file (`moe-serve up`)."""
    from moe_serve.cli.cluster_commands import ClusterInfo
    from moe_serve.config import CommonSettings
    from moe_serve.runtime.security import ClusterCredentials

    if secret_file is None and cluster_file.is_file():
        secret_file = Path(ClusterInfo.read(cluster_file).secret_file or "") or None
    flags = internal_security_flags(ca, cert, key, secret_file, None)
    try:
        return ClusterCredentials.from_settings(build_settings(CommonSettings, **flags))
    except ValueError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(2) from None


def public_security_flags(
    cert: Path | None, key: Path | None, client_ca: Path | None, tokens: Path | None
) -> dict[str, Path | None]:
    return {"tls_cert": cert, "tls_key": key, "tls_client_ca": client_ca, "auth_tokens_file": tokens}


def build_settings(settings_class: type[SettingsT], **flags: Any) -> SettingsT:
    """Settings from the environment, overridden by the flags that were given."""
    try:
        return settings_class(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "settings"
            # a validator's own ValueError says what to do; pydantic's "Value error, " prefix adds nothing
            message = str(problem.get("ctx", {}).get("error") or problem["msg"])
            console.print(f"[red]invalid {field}[/red]: {message}", soft_wrap=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def configuration_errors_reported() -> Iterator[None]:
    """A ConfigurationError becomes its message and exit code 1, never a stack trace."""
    try:
        yield
    except ConfigurationError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None


def run_service(coroutine: Any, event_loop: EventLoopName = "auto") -> None:
    with configuration_errors_reported():
        eventloop.run(coroutine, event_loop)
