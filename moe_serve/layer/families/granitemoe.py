"""Granite-MoE and Cohere2-MoE: top-k of the logits, then softmax over the k kept (`logit_topk_softmax`)
or, for Cohere2-MoE's expert_selection_fn "sigmoid", their sigmoids (`logit_topk_sigmoid`); weights cast
to the activation dtype. Cohere2-MoE adds num_shared_experts shared experts, summed with the routed
output or averaged with it. Both report the routing family "granitemoe" in ModelMetadata, as clients
expect. Weights: Granite's `block_sparse_moe.router.layer` with fused `input_linear` / `output_linear`;
Cohere2's `mlp.gate` with per-expert or fused experts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moe_serve.layer.families.base import DECODER_GATE, Family, RouterPattern, config_value, expert_activation
from moe_serve.model_spec import ExpertShape, RoutingConfig
from moe_serve.runtime.errors import ConfigurationError

GRANITE_ROUTER = RouterPattern(
    re.compile(r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.router\.layer\.weight$"), "router.layer"
)


def read_granitemoe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    # GraniteMoeTopKRouter: top-k of the float32 logits, softmax over the kept k, cast to the activation dtype
    return {
        "num_experts": int(config_value(config, path, "num_local_experts")),
        "routing": RoutingConfig(
            family="granitemoe",
            top_k=int(config_value(config, path, "num_experts_per_tok")),
            mechanism="logit_topk_softmax",
            weights_in_activation_dtype=True,
        ),
        "expert": ExpertShape(
            "swiglu", int(config_value(config, path, "intermediate_size")), expert_activation(config, path)
        ),
    }


def read_cohere2_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Cohere2-MoE: Granite-MoE's softmax over the kept logits or, with expert_selection_fn "sigmoid",
    their sigmoids renormalised when norm_topk_prob; shared experts (one MLP that many experts wide)
    added to the routed output ("sum") or averaged with it."""
    selection = config.get("expert_selection_fn", "softmax")
    if selection not in ("softmax", "sigmoid"):
        raise ConfigurationError(f"{path}: expert_selection_fn {selection!r} is not softmax or sigmoid")
    shared_count = int(config.get("num_shared_experts") or 0)
    strategy = config.get("shared_expert_combination_strategy", "average")
    if shared_count and strategy not in ("sum", "average"):
        raise ConfigurationError(f"{path}: shared_expert_combination_strategy {strategy!r} is not sum or average")
    expert_size = int(config_value(config, path, "intermediate_size"))
    activation = expert_activation(config, path)
    routing = RoutingConfig(
        family="granitemoe",
        top_k=int(config_value(config, path, "num_experts_per_tok")),
        mechanism="logit_topk_sigmoid" if selection == "sigmoid" else "logit_topk_softmax",
        normalize_top_k=selection == "sigmoid" and bool(config.get("norm_topk_prob", True)),
        weights_in_activation_dtype=True,
        output_scale=0.5 if shared_count and strategy == "average" else 1.0,
    )
    return {
        "num_experts": int(config_value(config, path, "num_experts")),
        "routing": routing,
        "expert": ExpertShape("swiglu", expert_size, activation),
        "shared_expert": ExpertShape("swiglu", expert_size * shared_count, activation) if shared_count else None,
    }


GRANITEMOE = Family(model_types=("granitemoe",), read_config=read_granitemoe, router_patterns=(GRANITE_ROUTER,))
COHERE2_MOE = Family(model_types=("cohere2_moe",), read_config=read_cohere2_moe, router_patterns=(DECODER_GATE,))
