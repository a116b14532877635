"""Qwen2/3-MoE, Qwen3-Next, OLMoE, FlexOlmo and Jamba: softmax -> top-k (`softmax_topk`), renormalised
when norm_topk_prob, combine weights cast to the activation dtype. Qwen2-MoE and Qwen3-Next add a
shared expert scaled by sigmoid(shared_expert_gate(x)). Weights: `model.layers.N.mlp.gate` (Jamba:
`feed_forward.router`), `experts.M.gate_proj/up_proj/down_proj` or the fused tensors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moe_serve.layer.families.base import DECODER_GATE, Family, RouterPattern, config_value, expert_activation
from moe_serve.model_spec import ExpertShape, RoutingConfig

JAMBA_ROUTER = RouterPattern(re.compile(r"^model\.layers\.(?P<layer>\d+)\.feed_forward\.router\.weight$"), "router")


def _routing(config: dict[str, Any], path: Path, normalize_top_k: bool) -> RoutingConfig:
    return RoutingConfig(
        family="qwen_moe",
        top_k=int(config_value(config, path, "num_experts_per_tok")),
        mechanism="softmax_topk",
        normalize_top_k=normalize_top_k,
        weights_in_activation_dtype=True,
    )


def read_qwen_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    activation = expert_activation(config, path)
    shared_size = int(config.get("shared_expert_intermediate_size") or 0)
    return {
        # Qwen2-MoE writes num_experts, Qwen3-MoE (transformers 5) num_local_experts
        "num_experts": int(config_value(config, path, "num_experts", "num_local_experts")),
        "routing": _routing(config, path, bool(config.get("norm_topk_prob", False))),
        "expert": ExpertShape("swiglu", int(config_value(config, path, "moe_intermediate_size")), activation),
        "shared_expert": ExpertShape("swiglu", shared_size, activation) if shared_size else None,
        "shared_expert_gated": bool(shared_size),
    }


def read_olmoe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """OLMoE routes as Qwen-MoE does (its router is the same code in transformers), has no shared
    expert, and its experts' width is `intermediate_size`."""
    return {
        "num_experts": int(config_value(config, path, "num_experts", "num_local_experts")),
        "routing": _routing(config, path, bool(config.get("norm_topk_prob", False))),
        "expert": ExpertShape(
            "swiglu", int(config_value(config, path, "intermediate_size")), expert_activation(config, path)
        ),
    }


def read_jamba(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Jamba: Qwen-MoE's rule without renormalisation (JambaTopKRouter keeps the top-k probabilities
    as they are), experts `intermediate_size` wide, no shared expert; its Mamba and attention layers
    are not the service's concern."""
    return {
        "num_experts": int(config_value(config, path, "num_experts")),
        "routing": _routing(config, path, normalize_top_k=False),
        "expert": ExpertShape(
            "swiglu", int(config_value(config, path, "intermediate_size")), expert_activation(config, path)
        ),
    }


QWEN_MOE = Family(model_types=("qwen2_moe", "qwen3_moe", "qwen3_next"), read_config=read_qwen_moe)
# FlexOlmo's router and experts are OLMoE's
OLMOE = Family(model_types=("olmoe", "flex_olmo"), read_config=read_olmoe)
# Jamba names its MoE router `feed_forward.router`; the decoder gate stays a candidate as before
JAMBA = Family(model_types=("jamba",), read_config=read_jamba, router_patterns=(DECODER_GATE, JAMBA_ROUTER))
