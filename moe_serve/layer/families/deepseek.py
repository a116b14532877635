"""DeepSeek-V2/V3 and the families that reuse DeepSeek-V3's MoE block (GLM-4.5, GLM-4.7-Flash,
dots.llm1, Solar Open, EXAONE-MoE) and MiniMax-M2.

- DeepSeek-V3 and its kin: `sigmoid_grouped_topk`: float32 logits, sigmoid scores, the selection bias
  (e_score_correction_bias) for choosing only, group-limited top-k, renormalised, x routed_scaling_factor;
  n_shared_experts shared experts as one MLP.
- MiniMax-M2: the same mechanism on logits in the activation dtype, one group, no shared expert.
- DeepSeek-V2: `softmax_grouped_topk`: softmax scores, group-limited only with "group_limited_greedy",
  never renormalised, x routed_scaling_factor.
Weights: `model.layers.N.mlp.gate` (+ `.e_score_correction_bias` on the router or the block),
`experts.M.gate_proj/up_proj/down_proj` or fused, `shared_experts.*`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_serve.layer.families.base import Family, config_value, expert_activation
from moe_serve.model_spec import ExpertShape, RoutingConfig
from moe_serve.runtime.errors import ConfigurationError


def read_deepseek_v3(config: dict[str, Any], path: Path) -> dict[str, Any]:
    expert_size = int(config_value(config, path, "moe_intermediate_size"))
    # EXAONE-MoE names its counts num_experts and num_shared_experts
    shared_count = int(config.get("n_shared_experts") or config.get("num_shared_experts") or 0)
    activation = expert_activation(config, path)
    num_experts = int(config_value(config, path, "n_routed_experts", "num_local_experts", "num_experts"))
    routing = RoutingConfig(
        family="deepseek_v3",
        top_k=int(config_value(config, path, "num_experts_per_tok")),
        mechanism="sigmoid_grouped_topk",
        normalize_top_k=bool(config.get("norm_topk_prob", True)),
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        num_groups=int(config.get("n_group") or 1),
        top_k_groups=int(config.get("topk_group") or 1),
    )
    if num_experts % routing.num_groups or not 1 <= routing.top_k_groups <= routing.num_groups:
        raise ConfigurationError(
            f"{path}: {num_experts} experts cannot form n_group={routing.num_groups} groups "
            f"with topk_group={routing.top_k_groups}"
        )
    return {
        "num_experts": num_experts,
        "routing": routing,
        "expert": ExpertShape("swiglu", expert_size, activation),
        # the n_shared_experts shared experts are one MLP of n_shared_experts x the expert width
        "shared_expert": ExpertShape("swiglu", expert_size * shared_count, activation) if shared_count else None,
    }


def read_deepseek_v2(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """DeepSeek-V2 (and V2-Lite): softmax scores, group-limited only with topk_method
    "group_limited_greedy", never renormalised (transformers ignores norm_topk_prob here)."""
    fields = read_deepseek_v3(config, path)
    method = config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigurationError(f"{path}: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    fields["routing"] = replace(
        fields["routing"],
        family="deepseek_v2",
        mechanism="softmax_grouped_topk",
        normalize_top_k=False,
        num_groups=fields["routing"].num_groups if grouped else 1,
        top_k_groups=fields["routing"].top_k_groups if grouped else 1,
    )
    return fields


def read_minimax_m2(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """MiniMax-M2: DeepSeek-V3's sigmoid scores with a selection bias, renormalised, on logits in the
    activation dtype; no groups, no scaling, no shared expert; experts `intermediate_size` wide.
    It reports the routing family "deepseek_v3" in ModelMetadata, as clients expect."""
    return {
        "num_experts": int(config_value(config, path, "num_local_experts")),
        "routing": RoutingConfig(
            family="deepseek_v3",
            top_k=int(config_value(config, path, "num_experts_per_tok")),
            mechanism="sigmoid_grouped_topk",
            logits_in_activation_dtype=True,
        ),
        "expert": ExpertShape(
            "swiglu", int(config_value(config, path, "intermediate_size")), expert_activation(config, path)
        ),
    }


DEEPSEEK_V2 = Family(model_types=("deepseek_v2",), read_config=read_deepseek_v2)
# GLM-4.5's MoE block and router are DeepSeek-V3's (transformers generates one from the other);
# GLM-4.7-Flash, Solar Open, EXAONE-MoE and dots.llm1: DeepSeek-V3's router, experts and shared experts again
DEEPSEEK_V3 = Family(
    model_types=("deepseek_v3", "glm4_moe", "glm4_moe_lite", "solar_open", "exaone_moe", "dots1"),
    read_config=read_deepseek_v3,
)
MINIMAX_M2 = Family(model_types=("minimax_m2",), read_config=read_minimax_m2)
