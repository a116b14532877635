"""What authenticating internal hops costs: the cluster token against mutual TLS, per message.

The internal data path is long-lived streams (a message per batch) plus a few unary calls, so both
shapes are timed, against an echo server in its own process: plaintext (no authentication), the
cluster secret (a token in the call's metadata: checked once per stream, once per unary call) and
mutual TLS (every message encrypted and authenticated). Modes alternate round by round, so a noisy
machine disturbs them alike.

`python -m moe_serve.bench.auth_cost` prints the figures as JSON; `moe-serve bench` runs it as its
`auth` section.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from moe_serve.cluster.processes import ServiceProcess, start_service_process
from moe_serve.runtime import eventloop
from moe_serve.runtime.grpc_utils import announce_ready, create_server, wait_for_termination
from moe_serve.runtime.security import INSECURE_INTERNAL, ClusterCredentials, InternalTLS, open_aio_channel

MODES = ("plaintext", "cluster secret", "mutual TLS")
PAYLOAD_BYTES = (4096, 1 << 20)
UNARY, STREAM = "/moe_serve.bench.AuthEcho/Echo", "/moe_serve.bench.AuthEcho/Chat"
BENCH_SECRET = b"moe-serve-bench-cluster-secret-0123456789"


def credentials(mode: str, certs: Path) -> ClusterCredentials:
    if mode == "plaintext":
        return INSECURE_INTERNAL
    if mode == "cluster secret":
        return ClusterCredentials(BENCH_SECRET)
    tls = InternalTLS.from_files(certs / "internal-ca.pem", certs / "internal.pem", certs / "internal.key")
    return ClusterCredentials(None, tls)


async def serve(mode: str, certs: Path) -> None:
    """An echo server protected as `mode` asks (run as a process of its own by `measure`)."""

    async def echo(request: bytes, context: aio.ServicerContext) -> bytes:
        return request

    async def chat(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        async for request in requests:
            await context.write(request)

    protection = credentials(mode, certs)
    server, port = create_server(
        "127.0.0.1", 0, 64 << 20, protection.server_credentials(), protection.server_interceptors()
    )
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo), "Chat": grpc.stream_stream_rpc_method_handler(chat)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("moe_serve.bench.AuthEcho", handlers)])
    await server.start()
    announce_ready("auth-echo", address=f"127.0.0.1:{port}", mode=mode)
    await wait_for_termination()
    await server.stop(0)


async def _time_mode(address: str, caller: ClusterCredentials, calls: int) -> dict[str, list[float]]:
    """Seconds per unary round trip and per stream message round trip, for each payload size."""
    samples: dict[str, list[float]] = {}
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with open_aio_channel(address, options, caller) as channel:
        unary, chat = channel.unary_unary(UNARY), channel.stream_stream(STREAM)
        stream = chat(metadata=caller.call_metadata())
        for size in PAYLOAD_BYTES:
            payload = bytes(size)
            unary_times, stream_times = (
                samples.setdefault(f"unary_{size}", []),
                samples.setdefault(f"stream_{size}", []),
            )
            for _ in range(calls):
                started = time.perf_counter()
                await unary(payload, timeout=30)
                unary_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                await stream.write(payload)
                await stream.read()
                stream_times.append(time.perf_counter() - started)
        await stream.done_writing()
    return samples


def measure(rounds: int = 5, calls: int = 100) -> dict[str, Any]:
    """p50 round trips (µs) per mode and shape, and each mode's cost over plaintext per message."""
    with tempfile.TemporaryDirectory() as directory:
        from moe_serve.runtime.certs import write_dev_certificates

        certs = Path(directory)
        write_dev_certificates(certs, [])
        servers: dict[str, ServiceProcess] = {}
        try:
            for mode in MODES:
                servers[mode] = start_service_process(
                    f"auth-echo ({mode})", ["serve", mode, directory], module="moe_serve.bench.auth_cost"
                )
            samples: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}

            async def run_rounds() -> None:
                for _ in range(rounds):
                    for mode in MODES:
                        timed = await _time_mode(servers[mode].address, credentials(mode, certs), calls)
                        for shape, values in timed.items():
                            samples[mode].setdefault(shape, []).extend(values)

            eventloop.run(run_rounds())
        finally:
            for server in servers.values():
                server.stop(grace_s=2)
    p50_us = {
        mode: {shape: round(statistics.median(values) * 1e6, 1) for shape, values in shapes.items()}
        for mode, shapes in samples.items()
    }
    baseline = p50_us["plaintext"]
    return {
        "p50_us": p50_us,
        "cost_over_plaintext_us": {
            mode: {shape: round(value - baseline[shape], 1) for shape, value in shapes.items()}
            for mode, shapes in p50_us.items()
            if mode != "plaintext"
        },
        "rounds": rounds,
        "calls_per_round": calls,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        eventloop.run(serve(argv[1], Path(argv[2])))
        return
    print(json.dumps(measure(), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
