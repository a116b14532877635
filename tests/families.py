"""Tiny models of every routing family, built with transformers from configs and saved with save_pretrained.

Each entry gives the model class, its config, where transformers keeps the MoE block of a served
layer, and how to ask that block's router for (logits, expert ids), so tests compare the served
layer with the module itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Cohere2MoeConfig,
    Cohere2MoeForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Dots1Config,
    Dots1ForCausalLM,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    ExaoneMoeConfig,
    ExaoneMoeForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    Lfm2MoeConfig,
    Lfm2MoeForCausalLM,
    MiniMaxConfig,
    MiniMaxForCausalLM,
    MiniMaxM2Config,
    MiniMaxM2ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    SolarOpenConfig,
    SolarOpenForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

D = 64
DECODER = {
    "hidden_size": D,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}


def _decoder_block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].mlp


def _granite_block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].block_sparse_moe


def _feed_forward_block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].feed_forward


def _router_router(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Granite-MoE and Jamba name the router `router`."""
    logits, _, ids = block.router(hidden)
    return logits.float(), ids


def _minimax_m2_router(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, _, ids = block.gate(hidden, block.e_score_correction_bias)
    return logits.float(), ids


def _lfm2_router(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, _, ids = block.gate(hidden, block.expert_bias)
    return logits.float(), ids


def _switch_block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    encoder_layers = model.config.num_layers
    if layer < encoder_layers:
        return model.encoder.block[layer].layer[1].mlp
    return model.decoder.block[layer - encoder_layers].layer[2].mlp


def _topk_router(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, _, ids = block.gate(hidden)
    return logits.float(), ids


def _switch_router(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, logits = block.router(hidden.unsqueeze(0))
    probabilities = torch.softmax(logits.float(), dim=-1).to(hidden.dtype)
    return logits[0].float(), torch.argmax(probabilities[0], dim=-1, keepdim=True)


@dataclass(frozen=True)
class Family:
    model_class: type
    config: Callable[[], Any]
    block: Callable[[torch.nn.Module, int], torch.nn.Module]
    router: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    moe_layers: tuple[int, ...]


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        MixtralForCausalLM,
        lambda: MixtralConfig(**DECODER, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
        _decoder_block,
        _topk_router,
        (0, 1, 2),
    ),
    # shared expert with sigmoid gate; layer 1 dense (mlp_only_layers); no renormalisation
    "qwen2_moe": Family(
        Qwen2MoeForCausalLM,
        lambda: Qwen2MoeConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=48,
            num_experts=6,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=96,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
        _decoder_block,
        _topk_router,
        (0, 2),
    ),
    # renormalised top-k, every other layer sparse
    "qwen3_moe": Family(
        Qwen3MoeForCausalLM,
        lambda: Qwen3MoeConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=3,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            head_dim=16,
        ),
        _decoder_block,
        _topk_router,
        (1,),
    ),
    # Qwen3-Next: Qwen-MoE routing (renormalised) with the gated shared expert, beside linear-attention
    # (Gated DeltaNet) layers; layer 1 dense (mlp_only_layers)
    "qwen3_next": Family(
        Qwen3NextForCausalLM,
        lambda: Qwen3NextConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=3,
            shared_expert_intermediate_size=48,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            head_dim=16,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
        _decoder_block,
        _topk_router,
        (0, 2),
    ),
    # Jamba: softmax top-k kept unnormalised, MoE in every other layer, beside Mamba layers
    # (the slow path: no mamba kernels on the CPU); attention in layer 1
    "jamba": Family(
        JambaForCausalLM,
        lambda: JambaConfig(
            **{**DECODER, "num_hidden_layers": 4},
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            use_mamba_kernels=False,
            mamba_d_state=8,
            mamba_dt_rank=8,
        ),
        _feed_forward_block,
        _router_router,
        (0, 2),
    ),
    # LFM2-MoE: sigmoid routing in the activation dtype with an expert bias, renormalised, scaled; a dense
    # first layer (num_dense_layers), short-convolution and attention layers
    "lfm2_moe": Family(
        Lfm2MoeForCausalLM,
        lambda: Lfm2MoeConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=3,
            num_dense_layers=1,
            routed_scaling_factor=1.5,
            layer_types=["conv", "full_attention", "conv"],
        ),
        _feed_forward_block,
        _lfm2_router,
        (1, 2),
    ),
    # MiniMax-Text-01: Mixtral's router and experts, beside lightning (linear) attention layers
    "minimax": Family(
        MiniMaxForCausalLM,
        lambda: MiniMaxConfig(
            **DECODER,
            intermediate_size=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        _decoder_block,
        _topk_router,
        (0, 1, 2),
    ),
    # sigmoid scores, selection bias, 4 groups choose 2, scaling, two shared experts, first layer dense
    "deepseek_v3": Family(
        DeepseekV3ForCausalLM,
        lambda: DeepseekV3Config(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # Qwen-MoE routing without renormalisation or shared expert; every layer sparse
    "olmoe": Family(
        OlmoeForCausalLM,
        lambda: OlmoeConfig(
            **DECODER, intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False
        ),
        _decoder_block,
        _topk_router,
        (0, 1, 2),
    ),
    # softmax scores, 4 groups choose 2 by their best score, no renormalisation, scaling, first layer dense
    "deepseek_v2": Family(
        DeepseekV2ForCausalLM,
        lambda: DeepseekV2Config(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # DeepSeek-V3 routing (GLM-4.5): 4 groups choose 2, scaling, one shared expert, first layer dense
    "glm4_moe": Family(
        Glm4MoeForCausalLM,
        lambda: Glm4MoeConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=1.8,
            head_dim=16,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # GLM-4.7-Flash: DeepSeek-V3 routing and multi-head latent attention; 2 groups choose 1, dense first layer
    "glm4_moe_lite": Family(
        Glm4MoeLiteForCausalLM,
        lambda: Glm4MoeLiteConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            mlp_layer_types=["dense", "sparse", "sparse"],
            routed_scaling_factor=1.8,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            pad_token_id=1,  # its defaults name GLM's 150k vocabulary
            eos_token_id=2,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # Solar Open: DeepSeek-V3 routing in every layer, one group, no scaling
    "solar_open": Family(
        SolarOpenForCausalLM,
        lambda: SolarOpenConfig(
            **DECODER,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            head_dim=16,
            pad_token_id=1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        _decoder_block,
        _topk_router,
        (0, 1, 2),
    ),
    # EXAONE-MoE: DeepSeek-V3 routing under its own config names (num_experts, num_shared_experts);
    # 4 groups choose 2, dense first layer
    "exaone_moe": Family(
        ExaoneMoeForCausalLM,
        lambda: ExaoneMoeConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            head_dim=16,
            pad_token_id=1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # ERNIE-4.5-MoE: float32 softmax, selection bias in the router's moe_statics, renormalised;
    # two shared experts; layer 0 dense (moe_layer_start_index)
    "ernie4_5_moe": Family(
        Ernie4_5_MoeForCausalLM,
        lambda: Ernie4_5_MoeConfig(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            moe_num_experts=8,
            moe_k=3,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            head_dim=16,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # Cohere2-MoE: top-k of the logits, softmax over the kept k (Granite-MoE's rule), one shared expert
    # averaged with the routed output (its default strategy), dense first layer
    "cohere2_moe": Family(
        Cohere2MoeForCausalLM,
        lambda: Cohere2MoeConfig(
            **DECODER,
            intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=2,
            mlp_layer_types=["dense", "sparse", "sparse"],
            prefix_dense_intermediate_size=80,
            head_dim=16,
            sliding_window=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # Cohere2-MoE's other selection: sigmoids of the kept logits, renormalised; shared expert summed
    "cohere2_moe_sigmoid": Family(
        Cohere2MoeForCausalLM,
        lambda: Cohere2MoeConfig(
            **DECODER,
            intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=3,
            num_shared_experts=1,
            shared_expert_combination_strategy="sum",
            expert_selection_fn="sigmoid",
            norm_topk_prob=True,
            head_dim=16,
            sliding_window=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        _decoder_block,
        _topk_router,
        (0, 1, 2),
    ),
    # dots.llm1: DeepSeek-V3 routing with no renormalisation (its default), 2 groups choose 1, dense first layer
    "dots1": Family(
        Dots1ForCausalLM,
        lambda: Dots1Config(
            **DECODER,
            intermediate_size=80,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            norm_topk_prob=False,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
        ),
        _decoder_block,
        _topk_router,
        (1, 2),
    ),
    # FlexOLMo: OLMoE's router and experts, renormalised top-k
    "flex_olmo": Family(
        FlexOlmoForCausalLM,
        lambda: FlexOlmoConfig(
            **DECODER,
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            pad_token_id=1,  # its defaults name OLMo's 100k vocabulary
            eos_token_id=2,
        ),
        _decoder_block,
        _topk_router,
        (0, 1, 2),
    ),
    # MiniMax-M2: sigmoid scores with a selection bias kept on the block, top-3 renormalised, logits in
    # the activation dtype
    "minimax_m2": Family(
        MiniMaxM2ForCausalLM,
        lambda: MiniMaxM2Config(
            **DECODER,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=3,
            head_dim=16,
            bos_token_id=1,  # its defaults name MiniMax's 200k vocabulary
            eos_token_id=2,
        ),
        _decoder_block,
        _minimax_m2_router,
        (0, 1, 2),
    ),
    # Granite-MoE: top-3 of the logits, softmax over the three kept, block at block_sparse_moe
    "granitemoe": Family(
        GraniteMoeForCausalLM,
        lambda: GraniteMoeConfig(**DECODER, intermediate_size=40, num_local_experts=8, num_experts_per_tok=3),
        _granite_block,
        _router_router,
        (0, 1, 2),
    ),
    # top-1, float32 router, capacity 3 per batch from the config; sparse blocks 1 and 3 of 4
    "switch": Family(
        SwitchTransformersForConditionalGeneration,
        lambda: SwitchTransformersConfig(
            d_model=D,
            d_ff=96,
            d_kv=16,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=2,
            num_experts=4,
            expert_capacity=3,
            vocab_size=128,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            router_jitter_noise=0.0,
        ),
        _switch_block,
        _switch_router,
        (1, 3),
    ),
}


def rescale_moe_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw MoE weights with 1/sqrt(fan_in) scale, so outputs are O(1) and tolerances mean something
    (transformers initialises with std 0.02), and give DeepSeek's selection bias real values."""
    generator = torch.Generator().manual_seed(seed)
    moe_markers = (".experts.", ".shared_expert", "router.classifier")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(marker in f".{name}" for marker in moe_markers) or name.endswith(("gate.weight", "router.weight")):
                values = torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[-1])
                parameter.copy_(values.to(parameter.dtype))
        # a buffer in DeepSeek-V3 (LFM2-MoE: expert_bias), a parameter in ERNIE-4.5's moe_statics
        for name, buffer in itertools.chain(model.named_buffers(), model.named_parameters()):
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                buffer.copy_((torch.randn(buffer.shape, generator=generator) * 0.1).to(buffer.dtype))


def save_family(
    family: str, directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any
) -> Path:
    """The family's tiny model, its config changed by `overrides` (e.g. n_routed_experts=256), saved."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    config = spec.config()
    for name, value in overrides.items():
        setattr(config, name, value)
    model = spec.model_class(config)
    rescale_moe_weights(model, seed)
    model.to(dtype).save_pretrained(directory)
    return directory


def load_reference(family: str, directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = FAMILIES[family].model_class.from_pretrained(directory, dtype=dtype)
    return model.eval()


def reference_output(family: str, model: torch.nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The family's MoE block output for hidden [T, d], as transformers computes it."""
    block = FAMILIES[family].block(model, layer)
    with torch.no_grad():
        return block(hidden.unsqueeze(0))[0]


def reference_routing(
    family: str, model: torch.nn.Module, layer: int, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(router logits [T, E] float32, expert ids [T, k]) as the family's router computes them."""
    block = FAMILIES[family].block(model, layer)
    with torch.no_grad():
        return FAMILIES[family].router(block, hidden)
