"""Rows and outputs through NIXL on a real stack (moe_serve/runtime/nixl_transport.py): every service
started with `--transports nixl`, so a worker reaches the router's arena, and the gateway a worker's,
by one-sided transfers as from another host (never mapped), in both router modes; answers stay exact,
and a sender that dies leaves its workers serving."""

from __future__ import annotations

import signal

import pytest
import torch

from moe_serve.bench.transports import rows_by_transport
from tests.helpers import (
    ExactLoad,
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
    start_process_stack,
    wait_until,
    worker_load,
)


@pytest.mark.parametrize("router_mode", ["embedded", "service"])
def test_rows_cross_by_nixl_transfers_exactly_and_a_dead_sender_leaves_workers_serving(
    checkpoints, router_mode
) -> None:
    checkpoint = checkpoints(torch.float32)
    workers_args = [["--experts", "0-3", "--metrics-port", "0"], ["--experts", "4-7", "--metrics-port", "0"]]
    stack = start_process_stack(checkpoint, workers_args, common=("--transports", "nixl"), router_mode=router_mode)
    try:
        block = reference_blocks(checkpoint, torch.float32)[0]
        channel, stub = kserve_stub(stack.address)

        def served_exactly(tokens: range) -> None:
            for count in tokens:
                hidden = torch.randn(count, 64, generator=torch.Generator().manual_seed(count))
                output = response_tensors(stub.ModelInfer(infer_request(stack.model, hidden), timeout=30))["output"]
                torch.testing.assert_close(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)

        def arrived() -> list[dict[str, float]]:
            return [rows_by_transport([str(worker.ready["metrics_address"])]) for worker in stack.workers]

        with channel:
            served_exactly(range(1, 40, 3))  # decode-sized batches, under NIXL's eager size: inside the message
            assert all(counted.get("nixl", 0) == 0 and counted["bytes"] > 0 for counted in arrived())
            served_exactly(range(600, 1000, 40))  # each worker's batch is over 64 KiB (256 B a row): transferred
            small = [counted["bytes"] for counted in arrived()]
            served_exactly(range(600, 1000, 40))
        for counted, before in zip(arrived(), small, strict=True):
            assert counted["nixl"] > 4000 and counted["bytes"] == before, counted  # every large batch by NIXL
            assert counted.get("shm", 0) == 0  # the router's arena was never mapped
        if router_mode == "service":  # outputs go to the gateway, which transfers large ones from the worker
            for worker in stack.workers:
                delivered = rows_by_transport([str(worker.ready["metrics_address"])], "delivered")
                assert delivered["nixl"] > 4000 and delivered.get("shm", 0) == 0, delivered
        sender = stack.gateway if router_mode == "embedded" else stack.router
        sender.process.send_signal(signal.SIGKILL)  # the process whose memory the workers read and write
        sender.process.wait(10)
        for worker in stack.workers:  # each worker dropped the dead peer's stream and still answers
            wait_until(lambda worker=worker: worker_load(worker.address).inflight_rows == 0, 10, "nothing in flight")
            assert worker.process.poll() is None
    finally:
        stack.stop()


def test_a_worker_killed_mid_transfer_loses_no_request(checkpoints) -> None:
    """Two workers hold every expert; one is killed while large batches go to both by NIXL. Its lent
    regions come back when its stream breaks, and its batches are recomputed on the other, exactly."""
    checkpoint = checkpoints(torch.float32)
    workers_args = [["--experts", "0-7", "--metrics-port", "0"], ["--experts", "0-7", "--metrics-port", "0"]]
    stack = start_process_stack(checkpoint, workers_args, common=("--transports", "nixl"), router_mode="embedded")
    try:
        block = reference_blocks(checkpoint, torch.float32)[0]
        channel, stub = kserve_stub(stack.address)
        with channel, ExactLoad(stub, stack.model, block, tokens=700) as load:
            load.wait_for(5, 30, "load running")
            stack.workers[0].process.send_signal(signal.SIGKILL)  # under a continuous load of large batches
            load.wait_for(15, 60, "answers after the kill")
        assert load.failures == []
        survivor = rows_by_transport([str(stack.workers[1].ready["metrics_address"])])
        assert survivor["nixl"] > 15 * 500, survivor  # the survivor kept taking its batches by NIXL
    finally:
        stack.stop()
