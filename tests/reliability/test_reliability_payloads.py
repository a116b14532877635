"""Large payloads: one message-size limit on every hop (--max-message-bytes 65536 here).

A request over the limit is refused with RESOURCE_EXHAUSTED naming both sizes; one just under it
is served exactly although its rows to the one worker are twice the limit (the router sends them
as several messages); an answer over the limit is refused the same way; requests in flight beside
them are never affected (an oversized message on an internal stream would break every call on it).
"""

from __future__ import annotations

import grpc
import torch

from tests.conftest import MESSAGE_LIMIT_BYTES
from tests.helpers import (
    gateway_stats,
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
)

NEAR_LIMIT_TOKENS = 250  # 64,000 bytes of FP32: fits; its 500 rows to one worker (130 KB) do not
OVER_LIMIT_TOKENS = 300  # 76,800 bytes
GATING_OUTPUTS = ("output", "router_logits", "expert_ids", "expert_weights", "dropped_mask")


def hidden_states(tokens: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_oversized_messages_are_refused_and_neighbours_are_exact(
    limited_stack, checkpoints, reliability_record
) -> None:
    stack = limited_stack
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    small = [hidden_states(8, seed) for seed in range(24)]
    near = [hidden_states(NEAR_LIMIT_TOKENS, seed) for seed in range(100, 104)]
    channel, stub = kserve_stub(stack.address)
    with channel:
        futures = [stub.ModelInfer.future(infer_request(stack.model, h), timeout=60) for h in small[:12]]
        futures += [stub.ModelInfer.future(infer_request(stack.model, h), timeout=60) for h in near]
        over = stub.ModelInfer.future(infer_request(stack.model, hidden_states(OVER_LIMIT_TOKENS, 7)), timeout=60)
        futures += [stub.ModelInfer.future(infer_request(stack.model, h), timeout=60) for h in small[12:]]
        big_answer = stub.ModelInfer.future(
            infer_request(stack.model, hidden_states(NEAR_LIMIT_TOKENS, 8), outputs=GATING_OUTPUTS), timeout=60
        )

        assert over.exception() is not None and over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in over.details() and f"vs. {MESSAGE_LIMIT_BYTES})" in over.details()
        assert big_answer.exception() is not None and big_answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Sent message larger than max" in big_answer.details()
        inputs = small[:12] + near + small[12:]
        wrong = 0
        for hidden, future in zip(inputs, futures, strict=True):
            output = response_tensors(future.result())["output"]
            wrong += not torch.allclose(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
        assert wrong == 0
        # the largest answer that fits: the output alone, for the near-limit request
        answer = response_tensors(stub.ModelInfer(infer_request(stack.model, near[0]), timeout=60))
        torch.testing.assert_close(answer["output"], reference_forward(block, near[0])[0], rtol=1e-5, atol=1e-5)
    stats = gateway_stats(stack.delivery_address)
    assert (stats.inflight_requests, stats.pending_dispatches) == (0, 0)
    reliability_record(
        "large-payloads",
        title="Requests and answers over the message-size limit",
        load=f"24 concurrent T=8 and 4 near-limit T={NEAR_LIMIT_TOKENS} requests (64 KB, 130 KB of rows per worker)",
        faults=f"a {OVER_LIMIT_TOKENS * 256}-byte request and a 76.7 KB answer; limit {MESSAGE_LIMIT_BYTES} B per hop",
        succeeded=len(inputs) + 1,
        failed=2,
        wrong_answers=wrong,
        recover_s=0.0,
        expected_failures="RESOURCE_EXHAUSTED naming the sizes (by design)",
    )


def test_16_bit_request_too_large_once_computed_in_fp32_is_refused_alone(limited_stack, checkpoints) -> None:
    """A BF16 request of 38 KB becomes 77 KB of FP32 hidden states on the way to the router."""
    stack = limited_stack
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    small = [hidden_states(8, seed) for seed in range(200, 216)]
    channel, stub = kserve_stub(stack.address)
    with channel:
        futures = [stub.ModelInfer.future(infer_request(stack.model, h), timeout=60) for h in small[:8]]
        upcast = stub.ModelInfer.future(
            infer_request(stack.model, hidden_states(OVER_LIMIT_TOKENS, 9, torch.bfloat16)), timeout=60
        )
        futures += [stub.ModelInfer.future(infer_request(stack.model, h), timeout=60) for h in small[8:]]
        outcomes = [f.code() for f in futures]
        assert upcast.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, upcast.details()
        assert "max_message_bytes" in upcast.details()
        assert outcomes == [grpc.StatusCode.OK] * len(small)
        for hidden, future in zip(small, futures, strict=True):
            output = response_tensors(future.result())["output"]
            torch.testing.assert_close(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
