"""One registry of the served families: `model_type` -> Family, and the spec built from a config.json.

model_spec, checkpoint and gating all look a family up here: its config reader gives the spec (and the
RoutingConfig naming the gating mechanism), its router patterns tell checkpoint where the routers are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_serve.layer.families.base import Family
from moe_serve.layer.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3, MINIMAX_M2
from moe_serve.layer.families.ernie4_5_moe import ERNIE4_5_MOE
from moe_serve.layer.families.granitemoe import COHERE2_MOE, GRANITEMOE
from moe_serve.layer.families.lfm2_moe import LFM2_MOE
from moe_serve.layer.families.mixtral import MIXTRAL
from moe_serve.layer.families.qwen_moe import JAMBA, OLMOE, QWEN_MOE
from moe_serve.layer.families.switch import SWITCH
from moe_serve.model_spec import MoEModelSpec, parse_dtype
from moe_serve.runtime.errors import ConfigurationError

ALL_FAMILIES: tuple[Family, ...] = (
    MIXTRAL,
    QWEN_MOE,
    OLMOE,
    JAMBA,
    DEEPSEEK_V2,
    DEEPSEEK_V3,
    MINIMAX_M2,
    ERNIE4_5_MOE,
    LFM2_MOE,
    GRANITEMOE,
    COHERE2_MOE,
    SWITCH,
)


def _by_model_type(families: tuple[Family, ...]) -> dict[str, Family]:
    registry: dict[str, Family] = {}
    for family in families:
        for model_type in family.model_types:
            if model_type in registry:
                raise ValueError(f"model_type {model_type!r} is registered by two families")
            registry[model_type] = family
    return registry


FAMILIES: dict[str, Family] = _by_model_type(ALL_FAMILIES)


def family_of(model_type: str, path: Path) -> Family:
    """The family that reads `model_type`; ConfigurationError naming the supported ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise ConfigurationError(
            f"{path}: model_type {model_type!r} is not a supported MoE family (supported: {supported})"
        )
    return family


def spec_from_config(config: dict[str, Any], path: Path) -> MoEModelSpec:
    """Build the spec from a parsed config.json (moe_layers still empty)."""
    model_type = config.get("model_type", "")
    family = family_of(model_type, path)
    fields = {
        "hidden_size": config.get("hidden_size"),
        "num_layers": int(config.get("num_hidden_layers", 1)),
        **family.read_config(config, path),
    }
    if fields["hidden_size"] is None:
        raise ConfigurationError(f"{path}: config.json has no hidden_size")
    spec = MoEModelSpec(
        model_type=model_type,
        hidden_size=int(fields.pop("hidden_size")),
        dtype=parse_dtype(config) or torch.float32,
        **fields,
    )
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ConfigurationError(f"{path}: num_experts_per_tok={spec.top_k} must be in [1, {spec.num_experts}]")
    return spec
