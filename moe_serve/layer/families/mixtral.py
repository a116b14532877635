"""Mixtral and MiniMax-Text-01: softmax -> top-k -> renormalise (`softmax_topk`), logits in the
activation dtype, combine weights float32; SwiGLU experts `intermediate_size` wide, no shared expert.
Weights: `model.layers.N.block_sparse_moe.gate` and `experts.M.w1/w3/w2` (or the fused tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_serve.layer.families.base import Family, config_value, expert_activation
from moe_serve.model_spec import ExpertShape, RoutingConfig


def read_mixtral(config: dict[str, Any], path: Path) -> dict[str, Any]:
    return {
        "num_experts": int(config_value(config, path, "num_local_experts")),
        "routing": RoutingConfig(
            family="mixtral", top_k=int(config_value(config, path, "num_experts_per_tok")), mechanism="softmax_topk"
        ),
        "expert": ExpertShape(
            "swiglu", int(config_value(config, path, "intermediate_size")), expert_activation(config, path)
        ),
    }


# MiniMax-Text-01's router and experts are Mixtral's
MIXTRAL = Family(model_types=("mixtral", "minimax"), read_config=read_mixtral)
