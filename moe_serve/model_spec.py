"""What a checkpoint's `config.json` says about its MoE layers: sizes, routing, expert kind, dtype.

The types every service shares (`MoEModelSpec`, `RoutingConfig`, `ExpertShape`) and the config
readers common to all families (`load_config`, `parse_dtype`). What differs per family (its config
keys, its weight names, its gating mechanism) lives in `moe_serve/layer/families/`, whose registry
builds a spec from a config (`spec_from_config`), so nothing downstream reads raw config dictionaries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from moe_serve.runtime.errors import ConfigurationError

CONFIG_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
ExpertKind = Literal["swiglu", "dense"]
SUPPORTED_ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh")
# gating mechanisms, named by what they compute (moe_serve.layer.gating implements each)
RoutingMechanism = Literal[
    "softmax_topk",
    "softmax_grouped_topk",
    "sigmoid_grouped_topk",
    "softmax_biased_topk",
    "sigmoid_topk",
    "logit_topk_softmax",
    "logit_topk_sigmoid",
    "switch_top1",
]


@dataclass(frozen=True)
class RoutingConfig:
    """How the router turns hidden states into (expert ids, combine weights) for one family.

    family: the routing family reported in ModelMetadata ("mixtral", "qwen_moe", "deepseek_v2",
        "deepseek_v3", "ernie4_5_moe", "lfm2_moe", "granitemoe" or "switch"); part of the protocol,
        so it keeps the name clients check (Cohere2-MoE reports "granitemoe", MiniMax-M2 "deepseek_v3").
    mechanism: the gating mechanism that routes, named by what it computes (keyword only).
    top_k: experts per token.
    normalize_top_k: renormalise the kept top-k weights (Mixtral always; Qwen/DeepSeek per config).
    routed_scaling_factor, num_groups, top_k_groups: DeepSeek-V2/V3 group-limited selection.
    weights_in_activation_dtype: the model casts combine weights to the activation dtype before
        scaling the expert outputs (Qwen, Switch); otherwise they stay float32 (Mixtral, DeepSeek).
    logits_in_activation_dtype: `sigmoid_grouped_topk` on logits computed in the activation dtype
        (MiniMax-M2) rather than in float32.
    norm_min: the renormalising sum is clamped to at least this (ERNIE-4.5's moe_norm_min).
    output_scale: multiplies every combine weight, the shared expert's included: 0.5 is Cohere2-MoE's
        "average" of the routed and shared outputs, (routed + shared) / 2.
    noise_std: noisy top-k gating (Shazeer et al. 2017) for experiments; 0 (the default) is off.
    """

    family: str
    top_k: int
    mechanism: RoutingMechanism = field(kw_only=True)
    normalize_top_k: bool = True
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    top_k_groups: int = 1
    weights_in_activation_dtype: bool = False
    logits_in_activation_dtype: bool = False
    norm_min: float = 0.0
    output_scale: float = 1.0
    noise_std: float = 0.0


@dataclass(frozen=True)
class ExpertShape:
    """One expert FFN: `swiglu` is down(act(gate(x)) * up(x)); `dense` is wo(act(wi(x)))."""

    kind: ExpertKind
    intermediate_size: int
    activation: str = "silu"


@dataclass(frozen=True)
class MoEModelSpec:
    """The MoE part of a checkpoint.

    hidden_size: d, the width of a hidden state.
    num_experts: E, routed experts per MoE layer; a shared expert, when there is one, is served
        as expert id E (one more unit of placement, run for every token).
    moe_layers: layer indices with an MoE block (found from the weights). For encoder-decoder
        models (Switch) decoder block b is layer `num_encoder_layers + b`.
    default_expert_capacity: the model's own capacity per batch (Switch's `expert_capacity`);
        0 means the model is dropless.
    """

    model_type: str
    hidden_size: int
    num_experts: int
    num_layers: int
    dtype: torch.dtype
    routing: RoutingConfig
    expert: ExpertShape
    shared_expert: ExpertShape | None = None
    shared_expert_gated: bool = False
    default_expert_capacity: int = 0
    num_encoder_layers: int = 0
    moe_layers: tuple[int, ...] = field(default=())

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def num_shared_slots(self) -> int:
        """Slots per token that go to the shared expert (0 or 1)."""
        return 1 if self.shared_expert is not None else 0

    @property
    def shared_expert_id(self) -> int:
        return self.num_experts

    @property
    def num_placed_experts(self) -> int:
        """Units of placement per MoE layer: routed experts plus the shared one."""
        return self.num_experts + self.num_shared_slots

    def expert_shape(self, expert: int) -> ExpertShape:
        if expert == self.shared_expert_id and self.shared_expert is not None:
            return self.shared_expert
        return self.expert


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


def load_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigurationError(f"{directory} is not a Hugging Face checkpoint: no config.json there")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{path} is not valid JSON: {error}") from None
