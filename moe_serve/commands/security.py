"""Security commands: `moe-serve certs` writes a development CA, certificates and a bearer token."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moe_serve.commands.common import app, console
from moe_serve.security import DEFAULT_INTERNAL_SERVER_NAME


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
    from moe_serve.certs import write_dev_certificates

    written = write_dev_certificates(directory, list(host or []), internal_server_name, days)
    table = Table("what", "file", title=f"development certificates in {directory}")
    for what, path in written.items():
        table.add_row(what, str(path))
    console.print(table)
    console.print(
        "gateway: --tls-cert gateway.pem --tls-key gateway.key [--auth-tokens-file tokens.json]; every service: "
        "--internal-tls-ca internal-ca.pem --internal-tls-cert internal.pem --internal-tls-key internal.key"
    )
