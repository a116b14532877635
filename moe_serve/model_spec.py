"""What a checkpoint's `config.json` says about its MoE layers: sizes, routing rule, dtype.

Only the fields the serving path needs are read. Families are detected from `model_type`;
each family's routing rule is described by `RoutingConfig` so the gating code never looks at
raw config dictionaries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_serve.errors import ConfigurationError

CONFIG_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# model_type -> routing family
FAMILY_BY_MODEL_TYPE = {
    "mixtral": "mixtral",
}


@dataclass(frozen=True)
class RoutingConfig:
    """How the router turns logits into (expert ids, weights) for one family.

    family: "mixtral" (softmax -> top-k -> renormalise).
    top_k: experts per token.
    normalize_top_k: renormalise the kept top-k probabilities to sum to 1.
    """

    family: str
    top_k: int
    normalize_top_k: bool = True


@dataclass(frozen=True)
class MoEModelSpec:
    """The MoE part of a checkpoint.

    hidden_size: d, the width of a hidden state.
    expert_intermediate_size: d_ff of one expert's SwiGLU FFN.
    num_experts: E, routed experts per MoE layer.
    moe_layers: decoder-layer indices that have an MoE block (filled in from the weights).
    dtype: the dtype the checkpoint declares (`dtype`, or `torch_dtype` in older files).
    """

    model_type: str
    hidden_size: int
    expert_intermediate_size: int
    num_experts: int
    num_layers: int
    dtype: torch.dtype
    hidden_act: str
    routing: RoutingConfig
    moe_layers: tuple[int, ...] = field(default=())

    @property
    def top_k(self) -> int:
        return self.routing.top_k


def _require(config: dict[str, Any], key: str, path: Path) -> Any:
    if key not in config:
        raise ConfigurationError(
            f"{path}: config.json has no {key!r}, which a {config.get('model_type')} MoE checkpoint must declare"
        )
    return config[key]


def parse_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype a config declares: `dtype` (transformers 5) or `torch_dtype` (older files)."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None:
        return None
    if name not in CONFIG_DTYPE_NAMES:
        raise ConfigurationError(
            f"unsupported checkpoint dtype {name!r}; expected one of {', '.join(CONFIG_DTYPE_NAMES)}"
        )
    return CONFIG_DTYPE_NAMES[name]


def spec_from_config(config: dict[str, Any], path: Path) -> MoEModelSpec:
    """Build the spec from a parsed config.json (moe_layers still empty)."""
    model_type = config.get("model_type", "")
    family = FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILY_BY_MODEL_TYPE))
        raise ConfigurationError(
            f"{path}: model_type {model_type!r} is not a supported MoE family (supported: {supported})"
        )
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigurationError(f"{path}: experts with hidden_act={hidden_act!r} are not supported (silu only)")
    routing = RoutingConfig(family=family, top_k=int(_require(config, "num_experts_per_tok", path)))
    spec = MoEModelSpec(
        model_type=model_type,
        hidden_size=int(_require(config, "hidden_size", path)),
        expert_intermediate_size=int(_require(config, "intermediate_size", path)),
        num_experts=int(_require(config, "num_local_experts", path)),
        num_layers=int(config.get("num_hidden_layers", 1)),
        dtype=parse_dtype(config) or torch.float32,
        hidden_act=hidden_act,
        routing=routing,
    )
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ConfigurationError(f"{path}: num_experts_per_tok={spec.top_k} must be in [1, {spec.num_experts}]")
    return spec


def load_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigurationError(f"{directory} is not a Hugging Face checkpoint: no config.json there")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{path} is not valid JSON: {error}") from None
