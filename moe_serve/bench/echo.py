"""A bare gRPC unary echo server (bytes in, same bytes out): the cost floor of one hop.

Run as `python -m moe_serve.bench.echo`; prints the ready line with its address.
"""

from __future__ import annotations

import grpc
from grpc import aio

from moe_serve.runtime import eventloop
from moe_serve.runtime.grpc_utils import announce_ready, server_options, wait_for_termination

ECHO_METHOD = "/moe_serve.bench.Echo/Echo"


async def _echo(request: bytes, context: aio.ServicerContext) -> bytes:
    return request


async def serve() -> None:
    server = aio.server(options=server_options(64 << 20))
    handler = grpc.method_handlers_generic_handler(
        "moe_serve.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    announce_ready("echo", address=f"127.0.0.1:{port}")
    await wait_for_termination()
    await server.stop(1)


if __name__ == "__main__":
    eventloop.run(serve())
