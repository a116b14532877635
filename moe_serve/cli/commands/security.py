"""Security commands: `moe-serve certs` writes a development CA, certificates, a bearer token and a cluster
secret; `moe-serve secret` writes a cluster secret alone (Compose runs it once per deployment)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moe_serve.cli.commands.common import app, console
from moe_serve.runtime.security import DEFAULT_INTERNAL_SERVER_NAME


@app.command(rich_help_panel="Tools")
def certs(
    directory: Annotated[Path, typer.Argument(help="Where to write the files.")] = Path(".moe-serve/certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(help="Extra name or IP the gateway is reached at (repeatable); localhost, 127.0.0.1, ::1 always."),
    ] = None,
    internal_server_name: Annotated[
        str, typer.Option(help="Name on the internal certificate (services check it instead of the dialed host).")
    ] = DEFAULT_INTERNAL_SERVER_NAME,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 365,
) -> None:
    """Write development certificates: TLS for the public port, mutual TLS between services, a bearer token."""
    from moe_serve.runtime.certs import write_dev_certificates

    written = write_dev_certificates(directory, list(host or []), internal_server_name, days)
    table = Table("what", "file", title=f"development certificates in {directory}")
    for what, path in written.items():
        table.add_row(what, str(path))
    console.print(table)
    console.print(
        "gateway: --tls-cert gateway.pem --tls-key gateway.key [--auth-tokens-file tokens.json]; every service: "
        "--internal-tls-ca internal-ca.pem --internal-tls-cert internal.pem --internal-tls-key internal.key "
        "--cluster-secret-file cluster.secret"
    )


@app.command(rich_help_panel="Tools")
def secret(
    path: Annotated[Path, typer.Argument(help="File to hold the cluster secret (written mode 0600).")],
    replace: Annotated[bool, typer.Option("--replace", help="Write a new secret over an existing one.")] = False,
) -> None:
    """Write a new cluster secret to PATH unless one is there: the credential every internal hop of a
    stack checks (point each service at it with MOE_SERVE_CLUSTER_SECRET_FILE or --cluster-secret-file)."""
    from moe_serve.runtime.security import new_cluster_secret, write_secret_file

    if path.is_file() and path.stat().st_size and not replace:
        console.print(f"a cluster secret is already at {path}; kept (--replace writes a new one)")
        return
    write_secret_file(path, new_cluster_secret())
    console.print(f"wrote a new cluster secret to {path} (mode 0600)")
