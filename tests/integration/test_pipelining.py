"""Gateway pipelining: a long request routed as concurrent chunks answers as the whole batch does.

Extra gateways with --pipeline-chunk-tokens run against the routers of the session's stacks, so
the same router and workers serve the chunked and the whole requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from moe_serve.cluster.processes import ServiceProcess, start_service_process
from tests.helpers import (
    gateway_stats,
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
    wait_until,
)

CHUNK = 16
TOKENS = 300  # 19 chunks of 15 or 16 tokens
CHUNKS = 19
OUTPUTS = ("output", "router_logits", "expert_ids", "expert_weights", "dropped_mask")


@pytest.fixture(scope="module")
def gateway_for(stacks) -> Iterator[Callable[..., ServiceProcess]]:
    started: dict[tuple, ServiceProcess] = {}

    def start(dtype: torch.dtype, *flags: str) -> ServiceProcess:
        key = (dtype, flags)
        if key not in started:
            stack = stacks(dtype)
            arguments = ["gateway", "--router-address", stack.router.address, "--port", "0"]
            started[key] = start_service_process(
                "gateway-chunked", [*arguments, "--model-name", stack.model_name, *flags]
            )
        return started[key]

    yield start
    for process in started.values():
        process.stop()


def dispatches_after(gateway: ServiceProcess, before: int, added: int) -> None:
    """The gateway counted `added` more dispatch batches (just after answering) and holds nothing."""
    address = gateway.ready["delivery_address"]
    wait_until(lambda: gateway_stats(address).dispatches >= before + added, 5, "dispatches counted")
    stats = gateway_stats(address)
    assert stats.dispatches == before + added
    assert stats.inflight_requests == 0 and stats.pending_dispatches == 0


def served(address: str, model: str, hidden: torch.Tensor, layer: int = 0) -> dict[str, torch.Tensor]:
    channel, stub = kserve_stub(address)
    with channel:
        request = infer_request(model, hidden, layer=layer, outputs=OUTPUTS)
        return response_tensors(stub.ModelInfer(request, timeout=60))


@pytest.mark.parametrize("layer", [0, 1])
def test_chunked_fp32_request_equals_transformers_and_the_whole_batch(stacks, checkpoints, gateway_for, layer) -> None:
    stack = stacks(torch.float32)
    chunked = gateway_for(torch.float32, "--pipeline-chunk-tokens", str(CHUNK))
    hidden = torch.randn(TOKENS, 64, generator=torch.Generator().manual_seed(40 + layer))
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[layer]
    before = gateway_stats(chunked.ready["delivery_address"]).dispatches

    result = served(chunked.address, stack.model_name, hidden, layer)
    dispatches_after(chunked, before, CHUNKS)
    whole = served(stack.address, stack.model_name, hidden, layer)
    expected_output, expected_logits, expected_ids = reference_forward(block, hidden)

    assert result["output"].shape == (TOKENS, 64)
    torch.testing.assert_close(result["output"], expected_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["router_logits"], expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(result["expert_ids"].long(), expected_ids)
    # gating is per token: the chunks' routing is the whole batch's, in token order
    for name in ("router_logits", "expert_ids", "expert_weights", "dropped_mask"):
        assert torch.equal(result[name], whole[name]), name


def test_chunked_bf16_request_routes_as_transformers(stacks, checkpoints, gateway_for) -> None:
    stack = stacks(torch.bfloat16)
    chunked = gateway_for(torch.bfloat16, "--pipeline-chunk-tokens", str(CHUNK))
    hidden = torch.randn(TOKENS, 64, generator=torch.Generator().manual_seed(50)).to(torch.bfloat16)
    block = reference_blocks(checkpoints(torch.bfloat16), torch.bfloat16)[0]

    result = served(chunked.address, stack.model_name, hidden)
    expected_output, expected_logits, expected_ids = reference_forward(block, hidden)

    assert result["output"].dtype == torch.bfloat16
    assert torch.equal(result["expert_ids"].long(), expected_ids)
    torch.testing.assert_close(result["router_logits"], expected_logits, rtol=0, atol=0)
    # chunks change how many rows each expert matmul sees; BF16 results stay within one rounding step
    torch.testing.assert_close(result["output"].float(), expected_output.float(), rtol=1.6e-2, atol=1e-2)


def test_a_capacity_limit_keeps_the_request_whole(stacks, gateway_for) -> None:
    # capacity counts rows over the whole batch: chunks would each get their own, smaller limit
    stack = stacks(torch.float32)
    limited = gateway_for(torch.float32, "--capacity-factor", "1.0")
    limited_chunked = gateway_for(torch.float32, "--capacity-factor", "1.0", "--pipeline-chunk-tokens", str(CHUNK))
    hidden = torch.randn(TOKENS, 64, generator=torch.Generator().manual_seed(60))

    whole = served(limited.address, stack.model_name, hidden)
    before = gateway_stats(limited_chunked.ready["delivery_address"]).dispatches
    result = served(limited_chunked.address, stack.model_name, hidden)
    dispatches_after(limited_chunked, before, 1)

    assert int(whole["dropped_mask"].sum()) > 0  # the limit bites on this batch
    for name in OUTPUTS:
        assert torch.equal(result[name], whole[name]), name


def test_a_failing_chunk_fails_the_request_with_its_own_status(stacks, gateway_for) -> None:
    # the gateway's default deadline (no client deadline) passes while the chunks are in flight
    stack = stacks(torch.float32)
    hurried = gateway_for(torch.float32, "--pipeline-chunk-tokens", str(CHUNK), "--request-timeout", "0.001")
    hidden = torch.randn(TOKENS, 64, generator=torch.Generator().manual_seed(70))
    channel, stub = kserve_stub(hurried.address)
    with channel, pytest.raises(grpc.RpcError) as failure:
        stub.ModelInfer(infer_request(stack.model_name, hidden), timeout=None)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failure.value.details()
    assert "deadline" in failure.value.details()
    wait_until(lambda: gateway_stats(hurried.ready["delivery_address"]).pending_dispatches == 0, 5, "chunks closed")
    assert gateway_stats(hurried.ready["delivery_address"]).inflight_requests == 0
