"""The `moe-serve` command line: run the stack or one service, send a request, make a demo checkpoint."""

from __future__ import annotations

from moe_serve.commands import services, stack, tools
from moe_serve.commands.common import app

__all__ = ["app", "main", "services", "stack", "tools"]


def main() -> None:
    app()
