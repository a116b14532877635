"""The `moe-serve` command line: run the stack or one service, send a request, make a demo checkpoint."""

from __future__ import annotations

import importlib
import os

# Without GRPC_VERBOSITY, gRPC core writes its INFO lines to stderr, e.g. "chttp2_transport.cc ... Got
# goaway ... Cancelling all calls" in every process whose peer stops while a long-lived internal stream
# is open (a normal shutdown). ERROR is gRPC's documented default; set before grpc loads, and
# inherited by every child (`up` passes it to the Ray worker actors too).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from moe_serve.cli.commands.common import app
from moe_serve.cluster.lifecycle import die_with_parent

# importing a module registers its commands; this order is the order of the help screen's panels
COMMAND_MODULES = ("stack", "services", "client", "tools", "planning", "security")
for _module in COMMAND_MODULES:
    importlib.import_module(f"moe_serve.cli.commands.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    die_with_parent()  # a child of `moe-serve up` goes when `up` goes, even on SIGKILL
    app()
