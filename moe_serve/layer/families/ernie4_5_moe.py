"""ERNIE-4.5-MoE: `softmax_biased_topk`: float32 softmax; top-k of the probabilities plus the selection
bias; the chosen probabilities renormalised (sum clamped to moe_norm_min), cast to the activation dtype;
moe_num_shared_experts shared experts (one MLP that many experts wide) added.
Weights: `model.layers.N.mlp.gate`, the bias in `moe_statics.e_score_correction_bias` ([1, E]) on the
router (transformers) or on the block (Baidu's files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_serve.layer.families.base import Family, config_value, expert_activation
from moe_serve.model_spec import ExpertShape, RoutingConfig
from moe_serve.runtime.errors import ConfigurationError


def read_ernie4_5_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    if config.get("use_bias"):
        raise ConfigurationError(f"{path}: use_bias=true (biased shared-expert projections) is not supported")
    expert_size = int(config_value(config, path, "moe_intermediate_size"))
    shared_count = int(config.get("moe_num_shared_experts") or 0)
    activation = expert_activation(config, path)
    routing = RoutingConfig(
        family="ernie4_5_moe",
        top_k=int(config_value(config, path, "moe_k", "num_experts_per_tok")),
        mechanism="softmax_biased_topk",
        weights_in_activation_dtype=True,
        norm_min=float(config.get("moe_norm_min", 1e-12)),
    )
    return {
        "num_experts": int(config_value(config, path, "moe_num_experts", "num_experts")),
        "routing": routing,
        "expert": ExpertShape("swiglu", expert_size, activation),
        "shared_expert": ExpertShape("swiglu", expert_size * shared_count, activation) if shared_count else None,
    }


ERNIE4_5_MOE = Family(model_types=("ernie4_5_moe",), read_config=read_ernie4_5_moe)
