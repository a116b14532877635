"""Expert offloading through the full stack (router, gateway and worker processes, real gRPC).

Two workers own 8 experts each (4 per MoE layer) with a device budget of a quarter of them, so
almost every batch evicts something. Results must still equal transformers; each worker's own
accounting must show the budget was never exceeded; and the router's prefetch hints must raise the
hit rate on a trace whose layer-1 experts follow from its layer-0 experts.
"""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from rich.console import Console

from moe_serve.checkpoint import Checkpoint
from moe_serve.cli.top import gateway_source, render
from moe_serve.cluster.launcher import wait_until_ready
from moe_serve.cluster.processes import ServiceProcess, start_service_process
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.worker_record import WorkerRecord
from tests.helpers import (
    infer_request,
    internal_channel,
    internal_credentials,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
)
from tests.integration.test_topology import start_all

BUDGET = "0.25"  # of the 8 (layer, expert) pairs a worker owns: 2 resident at a time


@contextmanager
def offloading_stack(checkpoint: Path, prefetch: bool) -> Iterator[tuple[ServiceProcess, list[ServiceProcess]]]:
    router = start_service_process(
        "router",
        ["router", "--checkpoint", str(checkpoint), "--port", "0", "--prefetch" if prefetch else "--no-prefetch"],
    )
    processes = [router]
    try:
        workers = start_all(
            [
                (
                    f"offload-{index}",
                    [
                        "worker",
                        "--checkpoint",
                        str(checkpoint),
                        "--worker-index",
                        str(index),
                        "--num-workers",
                        "2",
                        "--port",
                        "0",
                        "--router-address",
                        router.address,
                        "--device-memory-budget",
                        BUDGET,
                        "--metrics-port",
                        "0",
                    ],
                )
                for index in range(2)
            ]
        )
        processes.extend(workers)
        wait_until_ready(router.address, internal_credentials())
        gateway = start_service_process("gateway", ["gateway", "--router-address", router.address, "--port", "0"])
        processes.append(gateway)
        yield gateway, workers
    finally:
        for process in reversed(processes):
            process.stop()


def offload_state(worker: ServiceProcess) -> dict:
    """The worker's own accounting, asked directly (fresher than the registry's heartbeat)."""
    with internal_channel(worker.address) as channel:
        info = moe_grpc.ExpertWorkerStub(channel).Describe(moe_pb2.DescribeWorkerRequest(), timeout=10)
    return WorkerRecord.from_proto(info).offload


def test_offloaded_experts_give_exact_answers_within_the_budget(checkpoints) -> None:
    checkpoint = checkpoints(torch.float32)
    blocks = reference_blocks(checkpoint, torch.float32)
    rng = random.Random(1)
    with offloading_stack(checkpoint, prefetch=True) as (gateway, workers):
        channel, stub = kserve_stub(gateway.address)
        model = gateway.ready["model"]
        for step in range(24):
            layer = rng.choice([0, 1])
            hidden = torch.randn(rng.randint(1, 40), 64, generator=torch.Generator().manual_seed(step))
            result = response_tensors(stub.ModelInfer(infer_request(model, hidden, layer=layer), timeout=30))
            expected = reference_forward(blocks[layer], hidden)[0]
            torch.testing.assert_close(result["output"], expected, rtol=1e-5, atol=1e-5)
        # concurrent clients: experts are loaded and evicted under several batches at once
        futures = [
            stub.ModelInfer.future(
                infer_request(
                    model, torch.randn(16, 64, generator=torch.Generator().manual_seed(100 + i)), layer=i % 2
                ),
                timeout=60,
            )
            for i in range(16)
        ]
        for i, future in enumerate(futures):
            hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(100 + i))
            expected = reference_forward(blocks[i % 2], hidden)[0]
            torch.testing.assert_close(response_tensors(future.result())["output"], expected, rtol=1e-5, atol=1e-5)
        channel.close()
        for worker in workers:
            state = offload_state(worker)
            one_expert = state["budget_bytes"] // 2
            assert state["budget_bytes"] > 0 and state["peak_bytes"] <= state["budget_bytes"]
            assert state["resident_bytes"] <= state["budget_bytes"] and len(state["resident"]) <= 2
            assert state["evictions"] > 0 and state["misses"] > 0
            assert state["bytes_moved"] >= one_expert * state["misses"]
            # exported like the other metrics, from the same accounting
            text = urllib.request.urlopen(f"http://{worker.ready['metrics_address']}/metrics", timeout=10).read()
            metrics = text.decode()
            for name in ("moe_serve_offload_hits_total", "moe_serve_offload_misses_total", "moe_serve_offload_moved"):
                assert name in metrics, name
        # and shown by `moe-serve top`, read from the gateway's live state
        console = Console(record=True, width=200)
        console.print(render(gateway_source(gateway.ready["delivery_address"], internal_credentials())()))
        view = console.export_text()
        assert "expert offloading" in view and all(w.ready["worker_id"] in view for w in workers)


def steering_states(checkpoint: Path, layer: int, experts: tuple[int, int], tokens: int = 4) -> torch.Tensor:
    """Hidden states the router of `layer` sends to exactly `experts` (along their gate rows)."""
    gate = Checkpoint(checkpoint).router_weights(layer).gate.float()
    direction = gate[experts[0]] / gate[experts[0]].norm() + gate[experts[1]] / gate[experts[1]].norm()
    noise = 0.01 * torch.randn(tokens, gate.shape[1], generator=torch.Generator().manual_seed(sum(experts)))
    return 8.0 * direction + noise


ATTENTION_S = 0.05  # a small model's attention block on a busy 2-core machine


def hit_rate_on_patterned_trace(checkpoint: Path, prefetch: bool) -> tuple[float, int]:
    # four patterns; layer 1's experts follow from layer 0's, one expert on each worker at each layer
    patterns = [((0, 4), (1, 5)), ((1, 5), (2, 6)), ((2, 6), (3, 7)), ((3, 7), (0, 4))]
    rng = random.Random(7)
    blocks = reference_blocks(checkpoint, torch.float32)
    with offloading_stack(checkpoint, prefetch) as (gateway, workers):
        channel, stub = kserve_stub(gateway.address)
        model = gateway.ready["model"]
        for sequence in range(48):
            first, second = rng.choice(patterns)
            for layer, experts in ((0, first), (1, second)):
                if layer:  # the attention block between MoE layers: the window a hint's load overlaps
                    time.sleep(ATTENTION_S)
                hidden = steering_states(checkpoint, layer, experts)
                request = infer_request(
                    model, hidden, layer=layer, outputs=("output", "expert_ids"), parameters={"sequence_id": sequence}
                )
                result = response_tensors(stub.ModelInfer(request, timeout=30))
                assert set(result["expert_ids"].flatten().tolist()) == set(experts)  # the trace is what we meant
                torch.testing.assert_close(
                    result["output"], reference_forward(blocks[layer], hidden)[0], rtol=1e-5, atol=1e-5
                )
        channel.close()
        states = [offload_state(worker) for worker in workers]
    hits, misses = sum(s["hits"] for s in states), sum(s["misses"] for s in states)
    return hits / (hits + misses), sum(s["prefetched"] for s in states)


@pytest.mark.slow
def test_prefetch_hints_raise_the_hit_rate_on_repeated_expert_patterns(checkpoints) -> None:
    checkpoint = checkpoints(torch.float32)
    without, prefetched_without = hit_rate_on_patterned_trace(checkpoint, prefetch=False)
    with_hints, prefetched = hit_rate_on_patterned_trace(checkpoint, prefetch=True)
    assert prefetched_without == 0 and prefetched > 0
    assert with_hints >= without + 0.25, (without, with_hints)
