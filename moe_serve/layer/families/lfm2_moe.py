"""LFM2-MoE: `sigmoid_topk`: sigmoid scores in the activation dtype, expert_bias for choice only
(use_expert_bias), renormalised (sum + 1e-6) when norm_topk_prob, x routed_scaling_factor; SiLU experts,
no shared expert. Weights: `model.layers.N.feed_forward.gate`, the bias at `feed_forward.expert_bias`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_serve.layer.families.base import Family, config_value
from moe_serve.model_spec import ExpertShape, RoutingConfig


def read_lfm2_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    routing = RoutingConfig(
        family="lfm2_moe",
        top_k=int(config_value(config, path, "num_experts_per_tok")),
        mechanism="sigmoid_topk",
        normalize_top_k=bool(config.get("norm_topk_prob", True)),
        routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        weights_in_activation_dtype=True,
    )
    return {
        "num_experts": int(config_value(config, path, "num_experts")),
        "routing": routing,
        # Lfm2MoeExperts applies F.silu whatever the config names
        "expert": ExpertShape("swiglu", int(config_value(config, path, "moe_intermediate_size")), "silu"),
    }


LFM2_MOE = Family(model_types=("lfm2_moe",), read_config=read_lfm2_moe)
