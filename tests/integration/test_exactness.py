"""The served layer equals transformers' MixtralSparseMoeBlock on the same weights, through the full stack.

Gateway and router are separate processes, the experts live in two Ray worker actors, and the
reference block is loaded by transformers itself from the files save_pretrained wrote.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import infer_request, kserve_stub, reference_blocks, reference_forward, response_tensors

GATING_OUTPUTS = ("output", "router_logits", "expert_ids", "expert_weights")
# T=1 and T=3 leave most of the 8 experts without a token; 300 spans many rows per expert
TOKEN_COUNTS = (1, 3, 64, 300)


def served(stack, hidden: torch.Tensor, layer: int, **kwargs) -> dict[str, torch.Tensor]:
    channel, stub = kserve_stub(stack.address)
    with channel:
        request = infer_request(stack.model_name, hidden, layer=layer, outputs=GATING_OUTPUTS, **kwargs)
        return response_tensors(stub.ModelInfer(request, timeout=60))


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_fp32_equals_transformers(stacks, checkpoints, num_tokens: int, layer: int) -> None:
    stack = stacks(torch.float32)
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[layer]
    hidden = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens + layer))

    result = served(stack, hidden, layer)
    expected_output, expected_logits, expected_ids = reference_forward(block, hidden)

    assert result["output"].dtype == torch.float32 and result["output"].shape == (num_tokens, 64)
    torch.testing.assert_close(result["output"], expected_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["router_logits"], expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(result["expert_ids"].long(), expected_ids)
    assert result["expert_weights"].shape == (num_tokens, 2)
    torch.testing.assert_close(result["expert_weights"].sum(-1), torch.ones(num_tokens))


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_bf16_equals_transformers(stacks, checkpoints, num_tokens: int) -> None:
    stack = stacks(torch.bfloat16)
    block = reference_blocks(checkpoints(torch.bfloat16), torch.bfloat16)[0]
    hidden = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(100 + num_tokens))
    hidden = hidden.to(torch.bfloat16)

    result = served(stack, hidden, 0)
    expected_output, expected_logits, expected_ids = reference_forward(block, hidden)

    assert result["output"].dtype == torch.bfloat16
    assert torch.equal(result["expert_ids"].long(), expected_ids)
    torch.testing.assert_close(result["router_logits"], expected_logits, rtol=0, atol=0)
    # one bf16 rounding step of the O(1) outputs
    torch.testing.assert_close(result["output"].float(), expected_output.float(), rtol=0, atol=0)


def test_batched_three_dimensional_input_keeps_its_shape(stacks, checkpoints) -> None:
    stack = stacks(torch.float32)
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[1]
    hidden = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))

    result = served(stack, hidden.reshape(15, 64), 1, shape=[3, 5, 64])
    with torch.no_grad():
        expected = block(hidden)

    assert result["output"].shape == (3, 5, 64)
    torch.testing.assert_close(result["output"], expected, rtol=1e-5, atol=1e-5)
    assert result["router_logits"].shape == (15, 8)


def test_typed_fp32_contents_are_accepted(fp32_stack, fp32_client, checkpoints) -> None:
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    request = infer_request(fp32_stack.model_name, hidden)
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend(hidden.reshape(-1).tolist())

    result = response_tensors(fp32_client.ModelInfer(request, timeout=60))

    torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_to_fp32_model_is_computed_in_fp32_and_returned_in_its_dtype(
    fp32_stack, fp32_client, checkpoints, dtype: torch.dtype
) -> None:
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    hidden = torch.randn(6, 64, generator=torch.Generator().manual_seed(12)).to(dtype)

    result = response_tensors(fp32_client.ModelInfer(infer_request(fp32_stack.model_name, hidden), timeout=60))

    assert result["output"].dtype == dtype
    expected = reference_forward(block, hidden.float())[0].to(dtype)
    torch.testing.assert_close(result["output"], expected, rtol=0, atol=0)
