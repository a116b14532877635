"""Expert offloading through the full stack (router, gateway and worker processes, real gRPC).

Two workers own 8 experts each (4 per MoE layer) with a device budget of a quarter of them, so
almost every batch evicts something. Results must still equal transformers; each worker's own
accounting must show the budget was never exceeded; and the router's prefetch hints must raise the
hit rate on a trace whose layer-1 experts follow from its layer-0 experts.
"""

from __future__ import annotations

import random
import socket
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console

from moe_serve.checkpoint import Checkpoint
from moe_serve.cli.top import gateway_source, render
from moe_serve.cluster.launcher import reserve_port, wait_until_ready
from moe_serve.cluster.processes import ServiceProcess, spawn_service_process
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

BUDGET = "0.25"  # of the 8 (layer, expert) pairs a worker owns: 2 resident at a time


@dataclass
class OffloadingStack:
    """Router, two workers that offload (BUDGET) and a gateway, each its own process."""

    router: ServiceProcess
    workers: list[ServiceProcess]
    gateway: ServiceProcess


def spawn_offloading_stack(checkpoint: Path, prefetch: bool, processes: list[ServiceProcess]) -> socket.socket:
    """Spawn a stack's processes all at once, into `processes` (router, workers, gateway): the router
    listens on a port held for it (launcher.reserve_port, returned: close it once the router is
    ready), and the workers, which register as soon as it listens, and the gateway get its address
    before it is up."""
    reservation = reserve_port("127.0.0.1")
    assert reservation is not None
    port = str(reservation.getsockname()[1])
    router_address = f"127.0.0.1:{port}"
    prefetching = "--prefetch" if prefetch else "--no-prefetch"
    processes.append(
        spawn_service_process("router", ["router", "--checkpoint", str(checkpoint), "--port", port, prefetching])
    )
    for index in range(2):
        worker = [
            *("worker", "--checkpoint", str(checkpoint), "--worker-index", str(index), "--num-workers", "2"),
            *("--port", "0", "--router-address", router_address, "--device-memory-budget", BUDGET),
            *("--metrics-port", "0"),
        ]
        processes.append(spawn_service_process(f"offload-{index}", worker))
    processes.append(spawn_service_process("gateway", ["gateway", "--router-address", router_address, "--port", "0"]))
    return reservation


@contextmanager
def offloading_stacks(checkpoint: Path, prefetch: Sequence[bool]) -> Iterator[list[OffloadingStack]]:
    """One stack per value of `prefetch` (the router's hints on or off), all started at once."""
    processes: list[ServiceProcess] = []
    reservations: list[socket.socket] = []
    try:
        for value in prefetch:
            reservations.append(spawn_offloading_stack(checkpoint, value, processes))
        for process in processes:
            process.wait_ready()
        stacks = [
            OffloadingStack(processes[i], processes[i + 1 : i + 3], processes[i + 3])
            for i in range(0, len(processes), 4)
        ]
        for stack, reservation in zip(stacks, reservations, strict=True):
            reservation.close()  # the router listens
            wait_until_ready(stack.router.address, internal_credentials())
        yield stacks
    finally:
        for reservation in reservations:
            reservation.close()
        # the gateways first, then the workers, then the routers; the processes of each at once
        for role in (processes[3::4], processes[1::4] + processes[2::4], processes[0::4]):
            with ThreadPoolExecutor(max(1, len(role))) as pool:
                list(pool.map(ServiceProcess.stop, role))


def offload_state(worker: ServiceProcess) -> dict:
    """The worker's own accounting, asked directly (fresher than the registry's heartbeat)."""
    with internal_channel(worker.address) as channel:
        info = moe_grpc.ExpertWorkerStub(channel).Describe(moe_pb2.DescribeWorkerRequest(), timeout=10)
    return WorkerRecord.from_proto(info).offload


@pytest.fixture(scope="module")
def offloading(checkpoints, request) -> Iterator[dict[bool, OffloadingStack]]:
    """The stacks this module's selected tests use, by prefetch (router hints on or off), started
    together: the hit-rate test uses both, from fresh, so it comes first; the exactness test the one
    with hints."""
    wanted = [True]
    if any(item.name.startswith("test_prefetch_hints") for item in request.session.items):
        wanted.insert(0, False)
    with offloading_stacks(checkpoints(torch.float32), wanted) as stacks:
        yield dict(zip(wanted, stacks, strict=True))


def steering_states(checkpoint: Path, layer: int, experts: tuple[int, int], tokens: int = 4) -> torch.Tensor:
    """Hidden states the router of `layer` sends to exactly `experts` (along their gate rows)."""
    gate = Checkpoint(checkpoint).router_weights(layer).gate.float()
    direction = gate[experts[0]] / gate[experts[0]].norm() + gate[experts[1]] / gate[experts[1]].norm()
    noise = 0.01 * torch.randn(tokens, gate.shape[1], generator=torch.Generator().manual_seed(sum(experts)))
    return 8.0 * direction + noise


ATTENTION_S = 0.05  # a small model's attention block on a busy 2-core machine


def hit_rate_on_patterned_trace(checkpoint: Path, stack: OffloadingStack) -> tuple[float, int]:
    """Hit rate and experts prefetched over the trace (counted from the workers' figures before it)."""
    # four patterns; layer 1's experts follow from layer 0's, one expert on each worker at each layer
    patterns = [((0, 4), (1, 5)), ((1, 5), (2, 6)), ((2, 6), (3, 7)), ((3, 7), (0, 4))]
    rng = random.Random(7)
    blocks = reference_blocks(checkpoint, torch.float32)
    # each (layer, experts) of the trace always sends the same states: the reference answers them once
    inputs = {
        (layer, experts): steering_states(checkpoint, layer, experts)
        for pattern in patterns
        for layer, experts in enumerate(pattern)
    }
    expected = {key: reference_forward(blocks[key[0]], hidden)[0] for key, hidden in inputs.items()}
    before = [offload_state(worker) for worker in stack.workers]
    channel, stub = kserve_stub(stack.gateway.address)
    model = stack.gateway.ready["model"]
    with channel:
        for sequence in range(48):
            first, second = rng.choice(patterns)
            for layer, experts in ((0, first), (1, second)):
                if layer:  # the attention block between MoE layers: the window a hint's load overlaps
                    time.sleep(ATTENTION_S)
                hidden = inputs[layer, experts]
                request = infer_request(
                    model, hidden, layer=layer, outputs=("output", "expert_ids"), parameters={"sequence_id": sequence}
                )
                result = response_tensors(stub.ModelInfer(request, timeout=30))
                assert set(result["expert_ids"].flatten().tolist()) == set(experts)  # the trace is what we meant
                torch.testing.assert_close(result["output"], expected[layer, experts], rtol=1e-5, atol=1e-5)
    after = [offload_state(worker) for worker in stack.workers]

    def added(name: str) -> int:
        return sum(state[name] for state in after) - sum(state[name] for state in before)

    hits, misses = added("hits"), added("misses")
    return hits / (hits + misses), added("prefetched")


@pytest.mark.slow
def test_prefetch_hints_raise_the_hit_rate_on_repeated_expert_patterns(offloading, checkpoints) -> None:
    checkpoint = checkpoints(torch.float32)
    without, prefetched_without = hit_rate_on_patterned_trace(checkpoint, offloading[False])
    with_hints, prefetched = hit_rate_on_patterned_trace(checkpoint, offloading[True])
    assert prefetched_without == 0 and prefetched > 0
    assert with_hints >= without + 0.25, (without, with_hints)


def test_offloaded_experts_give_exact_answers_within_the_budget(offloading, checkpoints) -> None:
    """On the stack with hints (after the hit-rate trace when both run): evictions, misses and bytes
    moved are counted from the workers' figures before this test's requests."""
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    rng = random.Random(1)
    gateway, workers = offloading[True].gateway, offloading[True].workers
    before = {worker.address: offload_state(worker) for worker in workers}
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
            infer_request(model, torch.randn(16, 64, generator=torch.Generator().manual_seed(100 + i)), layer=i % 2),
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
        added = {name: state[name] - before[worker.address][name] for name in ("evictions", "misses", "bytes_moved")}
        one_expert = state["budget_bytes"] // 2
        assert state["budget_bytes"] > 0 and state["peak_bytes"] <= state["budget_bytes"]
        assert state["resident_bytes"] <= state["budget_bytes"] and len(state["resident"]) <= 2
        assert added["evictions"] > 0 and added["misses"] > 0
        assert added["bytes_moved"] >= one_expert * added["misses"]
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
