"""A port that cannot be listened on is a start-up error with one actionable line, never a trace."""

from __future__ import annotations

import asyncio
import socket

import pytest

from moe_serve.runtime.errors import ConfigurationError
from moe_serve.runtime.grpc_utils import create_server


def test_a_port_in_use_is_a_configuration_error_that_says_what_to_do() -> None:
    with socket.socket() as taken:  # listening without SO_REUSEPORT: nobody else may bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError) as raised:
            asyncio.run(bind(port))
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "in use" in message and "0 picks a free one" in message


def test_port_zero_binds_a_free_port() -> None:
    assert asyncio.run(bind(0)) > 0


async def bind(port: int) -> int:
    """create_server inside an event loop, as the services call it (a grpc.aio server needs one)."""
    _, bound = create_server("127.0.0.1", port, 1 << 20)
    return bound
