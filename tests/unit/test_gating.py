"""Gating math equals transformers' Mixtral router, in FP32 and BF16."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from moe_serve.checkpoint import RouterWeights
from moe_serve.layer.gating import compute_gating, copy_keeping_alignment
from moe_serve.model_spec import RoutingConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mixtral_gating_equals_transformers_router(dtype: torch.dtype, top_k: int) -> None:
    config = MixtralConfig(hidden_size=48, num_local_experts=6, num_experts_per_tok=top_k)
    router = MixtralTopKRouter(config)
    generator = torch.Generator().manual_seed(top_k)
    with torch.no_grad():
        router.weight.copy_(torch.randn(6, 48, generator=generator) / 48**0.5)
    router = router.to(dtype)
    hidden = torch.randn(257, 48, generator=generator).to(dtype)

    with torch.no_grad():
        logits, weights, ids = router(hidden)
    result = compute_gating(
        hidden,
        RouterWeights(router.weight.detach()),
        RoutingConfig(family="mixtral", top_k=top_k, mechanism="softmax_topk"),
    )

    assert result.router_logits.dtype == torch.float32
    assert torch.equal(result.router_logits, logits.float())
    assert torch.equal(result.expert_ids, ids)
    assert torch.equal(result.expert_weights, weights)
    torch.testing.assert_close(result.expert_weights.sum(-1), torch.ones(257))


@pytest.mark.parametrize("num_tokens", [1, 9, 40])
def test_logits_do_not_depend_on_where_the_decoded_bytes_sit(num_tokens: int) -> None:
    # hidden states arrive as torch.frombuffer views over protobuf bytes at any 4-byte offset;
    # the logits must still equal the model's, computed over a tensor torch allocated
    config = MixtralConfig(hidden_size=64, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    generator = torch.Generator().manual_seed(num_tokens)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64, generator=generator))
    weights = RouterWeights(router.weight.detach())
    for trial in range(8):
        hidden = torch.randn(num_tokens, 64, generator=generator)
        with torch.no_grad():
            expected, _, _ = router(hidden)
        for offset in range(0, 64, 4):
            buffer = bytearray(offset) + hidden.numpy().tobytes()
            decoded = torch.frombuffer(buffer, dtype=torch.float32, offset=offset).reshape(num_tokens, 64)
            result = compute_gating(
                decoded, weights, RoutingConfig(family="mixtral", top_k=2, mechanism="softmax_topk")
            )
            assert torch.equal(result.router_logits, expected), (trial, offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_weight_copies_keep_the_alignment_of_the_memory_map(dtype: torch.dtype) -> None:
    values = torch.randn(8, 64).to(dtype)
    for offset in range(0, 64, dtype.itemsize):
        mapped = torch.frombuffer(
            bytearray(offset) + values.view(torch.uint8).numpy().tobytes(), dtype=dtype, offset=offset
        )
        mapped = mapped.reshape(8, 64)
        copy = copy_keeping_alignment(mapped)
        assert copy.data_ptr() % 64 == mapped.data_ptr() % 64
        assert copy.data_ptr() != mapped.data_ptr() and torch.equal(copy, values)
        hidden = torch.randn(1, 64).to(dtype)
        assert torch.equal(torch.nn.functional.linear(hidden, copy), torch.nn.functional.linear(hidden, mapped))


def test_probabilities_are_float32_even_for_bf16_activations() -> None:
    hidden = torch.randn(4, 8).to(torch.bfloat16)
    weights = RouterWeights(torch.randn(5, 8).to(torch.bfloat16))
    result = compute_gating(hidden, weights, RoutingConfig(family="mixtral", top_k=2, mechanism="softmax_topk"))
    assert result.selection_scores.dtype == torch.float32 and result.expert_weights.dtype == torch.float32
    torch.testing.assert_close(result.selection_scores.sum(-1), torch.ones(4))


def test_noisy_top_k_is_off_by_default_seeded_when_on() -> None:
    generator = torch.Generator().manual_seed(0)
    router = RouterWeights(torch.randn(8, 16, generator=generator))
    hidden = torch.randn(200, 16, generator=generator)
    plain = RoutingConfig(family="mixtral", top_k=2, mechanism="softmax_topk")
    noisy = RoutingConfig(family="mixtral", top_k=2, mechanism="softmax_topk", noise_std=2.0)

    reference = compute_gating(hidden, router, plain)
    first = compute_gating(hidden, router, noisy, noise=torch.Generator().manual_seed(7))
    again = compute_gating(hidden, router, noisy, noise=torch.Generator().manual_seed(7))
    other = compute_gating(hidden, router, noisy, noise=torch.Generator().manual_seed(8))

    assert torch.equal(first.expert_ids, again.expert_ids)  # same seed, same choices
    assert not torch.equal(first.expert_ids, reference.expert_ids)  # the noise changes choices
    assert not torch.equal(first.expert_ids, other.expert_ids)
    torch.testing.assert_close(first.expert_weights.sum(-1), torch.ones(200))
    assert torch.equal(first.router_logits, reference.router_logits)  # logits are reported noise-free


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_v2_gating_equals_transformers_router(method: str, dtype: torch.dtype, tmp_path) -> None:
    """Both of DeepSeek-V2's top-k methods (V2-Lite routes greedily), parsed from a saved config."""
    import json

    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    from moe_serve.layer.families import spec_from_config

    config = DeepseekV2Config(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method=method,
        routed_scaling_factor=1.7,
        n_shared_experts=1,
        moe_intermediate_size=8,
    )
    config.save_pretrained(tmp_path)
    routing = spec_from_config(json.loads((tmp_path / "config.json").read_text()), tmp_path).routing
    router = DeepseekV2TopkRouter(config)
    generator = torch.Generator().manual_seed(len(method))
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 48, generator=generator) / 48**0.5)
    hidden = torch.randn(257, 48, generator=generator).to(dtype)

    with torch.no_grad():
        logits, weights, ids = router.to(dtype)(hidden)
    result = compute_gating(hidden, RouterWeights(router.weight.detach()), routing)

    assert (routing.num_groups, routing.normalize_top_k) == ((4 if method != "greedy" else 1), False)
    assert torch.equal(result.router_logits, logits)
    assert torch.equal(result.expert_ids, ids)
    assert torch.equal(result.expert_weights, weights)
