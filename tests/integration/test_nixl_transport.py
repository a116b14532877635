"""Rows through NIXL on a real stack (moe_serve/runtime/nixl_transport.py): every service started with
`--transports nixl`, so a worker reaches the router's arena by one-sided transfers as it would from
another host (it never maps it), in both router modes; answers stay exact, and a sender that dies
leaves its workers serving."""

from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
    start_process_stack,
    wait_until,
    worker_load,
)


def rows_by_transport(metrics_address: str) -> dict[str, float]:
    port = metrics_address.rpartition(":")[2]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        sample.labels["transport"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "moe_serve_worker_transport_rows_total"
    }


def arena_mappings(pid: int) -> int:
    return sum("memfd:moe-serve-arena" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


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
        with channel:
            for seed in range(40):
                hidden = torch.randn(1 + seed % 23 * 7, 64, generator=torch.Generator().manual_seed(seed))
                output = response_tensors(stub.ModelInfer(infer_request(stack.model, hidden), timeout=30))["output"]
                torch.testing.assert_close(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
        for worker in stack.workers:
            counted = rows_by_transport(str(worker.ready["metrics_address"]))
            # every batch but the stream's first (sent with the offer, before the worker answered it: the
            # first request is one token, so at most 2 rows) went through NIXL
            assert counted.get("nixl", 0) > 1000 and counted.get("bytes", 0) <= 2, counted
            assert counted.get("shm", 0) == 0 and arena_mappings(worker.process.pid) == 0  # never mapped
        sender = stack.gateway if router_mode == "embedded" else stack.router
        sender.process.send_signal(signal.SIGKILL)  # the process whose memory the workers read and write
        sender.process.wait(10)
        for worker in stack.workers:  # each worker dropped the dead peer's stream and still answers
            wait_until(lambda worker=worker: worker_load(worker.address).inflight_rows == 0, 10, "nothing in flight")
            assert worker.process.poll() is None
    finally:
        stack.stop()
