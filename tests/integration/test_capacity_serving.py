"""Capacity owned by the gateway, through real processes: GShard-style top-2 with drop and reroute,
counters, per-replica bounds, and cross-request batching.

Each test has a gateway of its own (with its own policy) in front of the session's FP32 or BF16 router
and workers; the module starts all six at once (`gateways`), so that their start-ups overlap instead of
queueing test after test. The expected results are computed independently from transformers' Mixtral
router and expert weights with a plain-loop statement of the rule (tests/capacity_reference.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
import torch.nn.functional as F

from moe_serve.cluster.launcher import Stack
from moe_serve.cluster.processes import ServiceProcess, spawn_service_process
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from tests.capacity_reference import reference_capacity
from tests.helpers import (
    infer_request,
    internal_channel,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
)

OUTPUTS = ("output", "expert_ids", "dropped_mask")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# each test's gateway: its model name -> (the session stack it fronts, its policy flags)
GATEWAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{
        f"capped-{rule}-{dtype}": (dtype, ("--capacity-factor", "1.0", "--overflow", rule))
        for dtype in DTYPES
        for rule in ("drop", "reroute")
    },
    "batched": ("fp32", ("--batch-window-ms", "50")),
    "replica-bound": ("fp32", ("--max-inflight-rows-per-replica", "96")),
}


@pytest.fixture(scope="module")
def gateways(stacks: Callable[[torch.dtype], Stack]) -> Iterator[dict[str, ServiceProcess]]:
    """Every GATEWAYS entry as a gateway process of its own, all spawned before any is waited for."""
    spawned: dict[str, ServiceProcess] = {}
    try:
        for dtype in DTYPES:  # the FP32 gateways start while the BF16 stack does (in a run that starts it here)
            router = stacks(DTYPES[dtype]).router.address
            for name, (stack_dtype, flags) in GATEWAYS.items():
                if stack_dtype == dtype:
                    arguments = ["gateway", "--router-address", router, "--port", "0", "--model-name", name, *flags]
                    spawned[name] = spawn_service_process(name, arguments)
        yield {name: gateway.wait_ready() for name, gateway in spawned.items()}
    finally:
        with ThreadPoolExecutor(max(1, len(spawned))) as pool:  # each stop waits for its drain: all at once
            list(pool.map(ServiceProcess.stop, spawned.values()))


def gshard_reference(block, hidden: torch.Tensor, capacity_factor: float, rule: str):
    """(output, final expert ids, dropped mask, dropped count, rerouted count) computed independently."""
    with torch.no_grad():
        logits, weights, ids = block.gate(hidden)
        probabilities = torch.softmax(logits.float(), dim=-1)
        num_tokens, top_k = ids.shape
        capacity = math.ceil(capacity_factor * num_tokens * top_k / probabilities.shape[1])
        final, status = reference_capacity(ids.tolist(), probabilities.tolist(), capacity, rule)
        output = torch.zeros(hidden.shape, dtype=torch.float32)
        for token in range(num_tokens):
            kept = [j for j in range(top_k) if status[token][j] != "dropped"]
            slot_weights = {
                j: float(weights[token, j])
                if status[token][j] == "kept"
                else float(probabilities[token, final[token][j]])
                for j in kept
            }
            if (rule == "reroute" and len(kept) < top_k) or any(status[token][j] == "rerouted" for j in kept):
                total = sum(slot_weights.values())
                slot_weights = {j: w * float(weights[token].sum()) / total for j, w in slot_weights.items()}
            for j, w in slot_weights.items():
                expert = final[token][j]
                gate, up = F.linear(hidden[token], block.experts.gate_up_proj[expert]).chunk(2, dim=-1)
                output[token] += w * F.linear(F.silu(gate) * up, block.experts.down_proj[expert]).float()
    dropped = torch.tensor([[s == "dropped" for s in row] for row in status])
    rerouted = sum(s == "rerouted" for row in status for s in row)
    return output, torch.tensor(final), dropped, int(dropped.sum()), rerouted


def gateway_stats(gateway: ServiceProcess) -> moe_pb2.GatewayStats:
    with internal_channel(gateway.ready["delivery_address"]) as channel:
        return moe_grpc.GatewayAdminStub(channel).GetStats(moe_pb2.GatewayStatsRequest(), timeout=10)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("rule", ["drop", "reroute"])
def test_gshard_top2_with_capacity_equals_independent_reference(
    gateways, checkpoints, rule: str, dtype_name: str
) -> None:
    dtype, name = DTYPES[dtype_name], f"capped-{rule}-{dtype_name}"
    gateway = gateways[name]
    block = reference_blocks(checkpoints(dtype), dtype)[0]
    channel, stub = kserve_stub(gateway.address)
    metadata = stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=name))
    assert metadata.parameters["overflow"].string_param == rule
    assert metadata.parameters["capacity_factor"].double_param == 1.0
    total_dropped = total_rerouted = 0
    for seed, num_tokens in enumerate((8, 33, 64)):
        hidden = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(seed))
        hidden[:, :8] += 2.0  # skew the router so some experts overflow
        hidden = hidden.to(dtype)
        response = stub.ModelInfer(infer_request(name, hidden, outputs=OUTPUTS), timeout=30)
        result = response_tensors(response)
        expected, final_ids, dropped, n_dropped, n_rerouted = gshard_reference(block, hidden, 1.0, rule)
        # the reference sums in float32 and rounds once; BF16 is compared within a bf16 rounding step
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
        torch.testing.assert_close(result["output"].float(), expected, **tolerance)
        assert torch.equal(result["expert_ids"].long(), final_ids)
        assert torch.equal(result["dropped_mask"], dropped)
        assert response.parameters["dropped_slots"].int64_param == n_dropped
        assert response.parameters["rerouted_slots"].int64_param == n_rerouted
        total_dropped += n_dropped
        total_rerouted += n_rerouted
    channel.close()
    assert total_dropped + total_rerouted > 0, "the skewed router must overflow some expert"
    if rule == "reroute":
        assert total_rerouted > 0
    stats = gateway_stats(gateway)
    assert sum(e.dropped_slots for e in stats.experts if e.layer == 0) == total_dropped
    assert sum(e.rerouted_slots for e in stats.experts if e.layer == 0) == total_rerouted
    assert sum(e.routed_rows for e in stats.experts) == (8 + 33 + 64) * 2 - total_dropped
    assert stats.requests == 3 and stats.dispatches == 3


def test_cross_request_batching_gives_each_client_its_own_rows(gateways, checkpoints) -> None:
    gateway = gateways["batched"]
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[1]
    sizes = [1, 3, 7, 12, 5, 20, 2, 9, 16, 4, 1, 30]
    inputs = [torch.randn(t, 64, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(sizes)]

    def call(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        channel, stub = kserve_stub(gateway.address)
        with channel:
            request = infer_request("batched", hidden, layer=1, outputs=("output", "expert_ids"))
            return response_tensors(stub.ModelInfer(request, timeout=30))

    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(call, inputs))
    for hidden, result in zip(inputs, results, strict=True):
        expected, _, expected_ids = reference_forward(block, hidden)
        assert result["output"].shape == hidden.shape
        torch.testing.assert_close(result["output"], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(result["expert_ids"].long(), expected_ids)
    stats = gateway_stats(gateway)
    assert stats.requests == len(inputs)
    assert stats.dispatches < len(inputs), "concurrent requests within the window must share dispatches"


def test_per_replica_inflight_bound_refuses_before_dispatch(gateways, checkpoints) -> None:
    gateway = gateways["replica-bound"]
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    inputs = [torch.randn(80, 64, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    channel, stub = kserve_stub(gateway.address)
    futures = [stub.ModelInfer.future(infer_request("replica-bound", h), timeout=30) for h in inputs]
    accepted, refused = 0, []
    for hidden, future in zip(inputs, futures, strict=True):
        try:
            result = response_tensors(future.result())
        except grpc.RpcError as error:
            refused.append(error)
            continue
        accepted += 1
        torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
    channel.close()
    assert accepted >= 1 and refused
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_rows_per_replica=96" in error.details()
    # the router's refusals count in the gateway's statistics like its own admission refusals
    stats = gateway_stats(gateway)
    assert (stats.requests, stats.rejected_requests) == (len(inputs), len(refused))
