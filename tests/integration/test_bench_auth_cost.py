"""The auth section of `moe-serve bench`: it runs, and each mode's server really is protected as named."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc import aio

from moe_serve.bench import auth_cost
from moe_serve.bench.report import print_internal_auth_report
from moe_serve.bench.runner import BenchResult
from moe_serve.cluster.processes import start_service_process
from moe_serve.runtime.security import INSECURE_INTERNAL, open_aio_channel


def test_auth_cost_measures_every_mode_and_shape() -> None:
    figures = auth_cost.measure(rounds=1, calls=5)
    shapes = {f"{kind}_{size}" for kind in ("unary", "stream") for size in auth_cost.PAYLOAD_BYTES}
    assert set(figures["p50_us"]) == set(auth_cost.MODES)
    assert all(set(by_shape) == shapes and min(by_shape.values()) > 0 for by_shape in figures["p50_us"].values())
    assert set(figures["cost_over_plaintext_us"]) == {"cluster secret", "mutual TLS"}
    print_internal_auth_report(BenchResult(config={}, machine={}, internal_auth=figures), _Console())


class _Console:
    def print(self, *_: object) -> None:  # the report renders without a terminal
        pass


@pytest.mark.parametrize("mode", auth_cost.MODES[1:])
def test_protected_modes_refuse_a_plain_caller(mode: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        from moe_serve.runtime.certs import write_dev_certificates

        write_dev_certificates(Path(directory), [])
        server = start_service_process("auth-echo", ["serve", mode, directory], module="moe_serve.bench.auth_cost")
        try:

            async def call() -> grpc.StatusCode:
                async with open_aio_channel(server.address, [], INSECURE_INTERNAL) as channel:
                    try:
                        await channel.unary_unary(auth_cost.UNARY)(b"x", timeout=5)
                    except aio.AioRpcError as error:
                        return error.code()
                return grpc.StatusCode.OK

            # the token mode refuses by status; mutual TLS never completes the handshake
            expected = grpc.StatusCode.UNAUTHENTICATED if mode == "cluster secret" else grpc.StatusCode.UNAVAILABLE
            assert asyncio.run(call()) == expected
        finally:
            server.stop(grace_s=2)
