"""Client commands: `moe-serve infer` (send a request to a gateway) and `moe-serve health` (probe a service)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_serve.cli.commands.common import InternalTlsCa, InternalTlsCert, InternalTlsKey, app, console
from moe_serve.runtime.security import ClientCredentials

Token = Annotated[
    str | None,
    typer.Option(envvar="MOE_SERVE_TOKEN", help="Bearer token (better: the MOE_SERVE_TOKEN environment variable)."),
]
TlsCa = Annotated[Path | None, typer.Option(help="Connect with TLS, trusting this CA (PEM); see also --tls.")]
UseTls = Annotated[bool, typer.Option("--tls", help="Connect with TLS, trusting the system's CAs.")]


def client_credentials(tls: bool, tls_ca: Path | None, token: str | None) -> ClientCredentials:
    return ClientCredentials(tls=tls, root_certificates=tls_ca.read_bytes() if tls_ca else None, token=token)


@app.command(rich_help_panel="Call a running stack")
def infer(
    url: Annotated[str, typer.Option(help="Gateway host:port.")] = "127.0.0.1:8001",
    model: Annotated[str | None, typer.Option(help="Model name (default: the demo model).")] = None,
    tokens: Annotated[int, typer.Option(help="Random tokens to send (ignored with --input).")] = 8,
    input_file: Annotated[Path | None, typer.Option("--input", help=".npy file of hidden states [T, d].")] = None,
    layer: Annotated[int, typer.Option(help="MoE layer.")] = 0,
    datatype: Annotated[str, typer.Option(help="FP32, FP16 or BF16 for random input.")] = "FP32",
    repeat: Annotated[int, typer.Option(help="Send the request this many times; report latency.")] = 1,
    seed: int = 0,
    timeout: Annotated[float, typer.Option(help="Deadline per request, in seconds.")] = 30.0,
    token: Token = None,
    tls: UseTls = False,
    tls_ca: TlsCa = None,
) -> None:
    """Send a request to a gateway and print a summary of the answer."""
    from moe_serve.cli.infer_command import run_infer

    raise typer.Exit(
        run_infer(
            console,
            url=url,
            model=model,
            tokens=tokens,
            input_file=input_file,
            layer=layer,
            datatype=datatype,
            repeat=repeat,
            seed=seed,
            timeout=timeout,
            credentials=client_credentials(tls, tls_ca, token),
        )
    )


@app.command(rich_help_panel="Call a running stack")
def health(
    address: Annotated[str, typer.Argument(help="host:port of any moe-serve service.")],
    service: Annotated[str, typer.Option(help="Service name to ask about ('' = the whole server).")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 3.0,
    tls: UseTls = False,
    tls_ca: TlsCa = None,
    internal_tls_ca: InternalTlsCa = None,
    internal_tls_cert: InternalTlsCert = None,
    internal_tls_key: InternalTlsKey = None,
) -> None:
    """Exit 0 when the service answers SERVING on grpc.health.v1 (for container health checks).

    The gateway's public port: --tls/--tls-ca when it has TLS; internal services with mutual TLS:
    the --internal-tls-* files.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moe_serve.runtime.security import ClusterCredentials, InternalTLS, open_channel

    # the public port (--tls/--tls-ca) wins over the internal certificate, which may come from the environment;
    # health needs no cluster secret (orchestrators probe it without one)
    if not (tls or tls_ca) and internal_tls_ca and internal_tls_cert and internal_tls_key:
        internal = InternalTLS.from_files(internal_tls_ca, internal_tls_cert, internal_tls_key)
        channel = open_channel(address, [], ClusterCredentials(None, internal))
    else:
        channel = client_credentials(tls, tls_ca, None).channel(address, [])
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            console.print(f"{address}: {error.code().name}: {error.details()}")
            raise typer.Exit(1) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    console.print(f"{address}: {status}")
    raise typer.Exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
