"""The client library against the session's FP32 Mixtral stack: MoEClient / AsyncMoEClient round trips
and errors, and patch_model refusing a model the gateway does not serve. patch_model computing what
the local model computes is in tests/integration/test_families.py (a stack per gating mechanism) and, for
every family it supports, in tests/unit/test_patching_local.py (the served algorithm in-process).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_serve.client import AsyncMoEClient, GatewayError, ModelMismatch, MoEClient, RemoteMoE, patch_model
from moe_serve.cluster.launcher import Stack
from tests.helpers import TINY_MIXTRAL, reference_blocks, reference_forward

TOLERANCE = 1e-5


def test_patch_model_refuses_a_model_the_gateway_does_not_serve(fp32_stack: Stack) -> None:
    other_shape = MixtralForCausalLM(MixtralConfig(**{**TINY_MIXTRAL, "hidden_size": 32, "num_hidden_layers": 3}))
    with pytest.raises(ModelMismatch) as raised:
        patch_model(other_shape, fp32_stack.address, fp32_stack.model_name)
    assert "hidden size: served 64, local 32" in str(raised.value)
    assert "MoE layers: served [0, 1], local [0, 1, 2]" in str(raised.value)
    assert not any(isinstance(module, RemoteMoE) for module in other_shape.modules())

    same_shape = MixtralForCausalLM(MixtralConfig(**TINY_MIXTRAL))
    with pytest.raises(ModelMismatch, match=f"does not serve 'no-such-model'.*{fp32_stack.model_name}"):
        patch_model(same_shape, fp32_stack.address, "no-such-model")
    with pytest.raises(ValueError, match="pass model_name="):  # built from a config: no directory to name it
        patch_model(same_shape, fp32_stack.address)


def test_sync_client_round_trip_equals_transformers(
    fp32_stack: Stack, checkpoints: Callable[[torch.dtype], Path]
) -> None:
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    with MoEClient(fp32_stack.address) as client:
        metadata = client.model_metadata(fp32_stack.model_name)
        assert (metadata.name, metadata.hidden_size, metadata.family) == (fp32_stack.model_name, 64, "mixtral")
        assert (metadata.moe_layers, metadata.num_experts, metadata.top_k) == ((0, 1), 8, 2)
        for layer, num_tokens in ((0, 1), (1, 9), (1, 33)):
            hidden = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens))
            result = client.infer(
                fp32_stack.model_name, hidden, layer=layer, outputs=("output", "router_logits", "expert_ids")
            )
            output, logits, ids = reference_forward(blocks[layer], hidden)
            torch.testing.assert_close(result["output"], output, rtol=TOLERANCE, atol=TOLERANCE)
            torch.testing.assert_close(result["router_logits"], logits, rtol=TOLERANCE, atol=TOLERANCE)
            assert torch.equal(result["expert_ids"].long(), ids)
        batched = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
        assert client.infer(fp32_stack.model_name, batched, layer=1)["output"].shape == (2, 5, 64)


def test_sync_client_raises_gateway_error_with_the_status(fp32_stack: Stack) -> None:
    with MoEClient(fp32_stack.address) as client:
        with pytest.raises(GatewayError) as raised:
            client.infer(fp32_stack.model_name, torch.randn(3, 63), layer=0)  # hidden size is 64
        assert raised.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(raised.value).startswith("INVALID_ARGUMENT in ModelInfer: ")
        with pytest.raises(GatewayError) as raised:
            client.infer(fp32_stack.model_name, torch.randn(3, 64), layer=5)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GatewayError) as raised:
            client.model_metadata("no-such-model")
        assert raised.value.status_code == grpc.StatusCode.NOT_FOUND


def test_async_client_round_trip_and_errors(fp32_stack: Stack, checkpoints: Callable[[torch.dtype], Path]) -> None:
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    hidden = [torch.randn(4 + i, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    async def scenario() -> tuple[list[dict[str, torch.Tensor]], GatewayError, int]:
        async with AsyncMoEClient(fp32_stack.address) as client:
            metadata = await client.model_metadata(fp32_stack.model_name)
            concurrent = [
                client.infer(fp32_stack.model_name, states, layer=i % 2, outputs=("output", "expert_ids"))
                for i, states in enumerate(hidden)
            ]
            results = await asyncio.gather(*concurrent)
            with pytest.raises(GatewayError) as raised:
                await client.infer(fp32_stack.model_name, torch.randn(2, 10))
            return results, raised.value, metadata.hidden_size

    results, error, hidden_size = asyncio.run(scenario())
    assert hidden_size == 64
    for i, (states, result) in enumerate(zip(hidden, results, strict=True)):
        output, _, ids = reference_forward(blocks[i % 2], states)
        torch.testing.assert_close(result["output"], output, rtol=TOLERANCE, atol=TOLERANCE)
        assert torch.equal(result["expert_ids"].long(), ids)
    assert error.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "64" in error.message
