"""What a checkpoint's `config.json` says about its MoE layers: sizes, routing rule, expert kind, dtype.

Families are detected from `model_type`; each has a small parser that turns its config keys
into `MoEModelSpec`, so nothing downstream reads raw config dictionaries.

| family      | model_type                  | routing                                                    |
| ----------- | --------------------------- | ---------------------------------------------------------- |
| mixtral     | mixtral, minimax            | softmax -> top-k -> renormalise                            |
| qwen_moe    | qwen2_moe, qwen3_moe,       | softmax -> top-k (-> renormalise if norm_topk_prob);        |
|             | qwen3_next, olmoe,          |                                                            |
|             | flex_olmo, jamba            | Qwen2/3-Next: a shared expert x sigmoid(shared_gate(x))    |
| deepseek_v2 | deepseek_v2                 | softmax, group-limited top-k (group_limited_greedy),        |
|             |                             | x routed_scaling_factor; shared experts                     |
| deepseek_v3 | deepseek_v3, glm4_moe,      | sigmoid, bias for selection, group-limited top-k,           |
|             | glm4_moe_lite, dots1,       | renormalise, x routed_scaling_factor; shared experts        |
|             | solar_open, exaone_moe,     |                                                            |
|             | minimax_m2                  | MiniMax-M2: logits in the activation dtype, one group      |
| ernie4_5_moe| ernie4_5_moe                | float32 softmax, bias for selection, renormalise            |
|             |                             | (sum clamped to moe_norm_min); shared experts               |
| lfm2_moe    | lfm2_moe                    | sigmoid in the activation dtype, bias for selection,        |
|             |                             | renormalise (sum + 1e-6), x routed_scaling_factor           |
| granitemoe  | granitemoe, cohere2_moe     | top-k of the logits -> softmax over the k kept             |
|             |                             | (Cohere2-MoE: or sigmoid; shared experts summed/averaged)   |
| switch      | switch_transformers         | float32 router, top-1, expert capacity from the config      |
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from moe_serve.errors import ConfigurationError

CONFIG_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
ExpertKind = Literal["swiglu", "dense"]
SUPPORTED_ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class RoutingConfig:
    """How the router turns hidden states into (expert ids, combine weights) for one family.

    family: "mixtral", "qwen_moe", "deepseek_v2", "deepseek_v3", "ernie4_5_moe", "lfm2_moe", "granitemoe"
        or "switch".
    top_k: experts per token.
    normalize_top_k: renormalise the kept top-k weights (Mixtral always; Qwen/DeepSeek per config).
    routed_scaling_factor, num_groups, top_k_groups: DeepSeek-V2/V3 group-limited selection.
    weights_in_activation_dtype: the model casts combine weights to the activation dtype before
        scaling the expert outputs (Qwen, Switch); otherwise they stay float32 (Mixtral, DeepSeek).
    logits_in_activation_dtype: DeepSeek-V3's sigmoid routing on logits computed in the activation
        dtype (MiniMax-M2) rather than in float32.
    sigmoid_top_k: the "granitemoe" rule turns the k kept logits into weights by sigmoid (in the
        activation dtype, renormalised when normalize_top_k) rather than softmax (Cohere2-MoE's
        expert_selection_fn "sigmoid").
    norm_min: the renormalising sum is clamped to at least this (ERNIE-4.5's moe_norm_min).
    output_scale: multiplies every combine weight, the shared expert's included: 0.5 is Cohere2-MoE's
        "average" of the routed and shared outputs, (routed + shared) / 2.
    noise_std: noisy top-k gating (Shazeer et al. 2017) for experiments; 0 (the default) is off.
    """

    family: str
    top_k: int
    normalize_top_k: bool = True
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    top_k_groups: int = 1
    weights_in_activation_dtype: bool = False
    logits_in_activation_dtype: bool = False
    sigmoid_top_k: bool = False
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


def _get(config: dict[str, Any], path: Path, *keys: str) -> Any:
    """The first of `keys` present in config.json (families renamed keys across versions)."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    raise ConfigurationError(
        f"{path}: config.json has none of {list(keys)}, which a {config.get('model_type')} MoE checkpoint declares"
    )


def _activation(config: dict[str, Any], path: Path, key: str = "hidden_act") -> str:
    activation = config.get(key, "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigurationError(
            f"{path}: expert activation {activation!r} is not supported ({', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    return activation


def _mixtral(config: dict[str, Any], path: Path) -> dict[str, Any]:
    return {
        "num_experts": int(_get(config, path, "num_local_experts")),
        "routing": RoutingConfig(family="mixtral", top_k=int(_get(config, path, "num_experts_per_tok"))),
        "expert": ExpertShape("swiglu", int(_get(config, path, "intermediate_size")), _activation(config, path)),
    }


def _qwen_routing(config: dict[str, Any], path: Path) -> RoutingConfig:
    return RoutingConfig(
        family="qwen_moe",
        top_k=int(_get(config, path, "num_experts_per_tok")),
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
        weights_in_activation_dtype=True,
    )


def _qwen_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    activation = _activation(config, path)
    shared_size = int(config.get("shared_expert_intermediate_size") or 0)
    return {
        # Qwen2-MoE writes num_experts, Qwen3-MoE (transformers 5) num_local_experts
        "num_experts": int(_get(config, path, "num_experts", "num_local_experts")),
        "routing": _qwen_routing(config, path),
        "expert": ExpertShape("swiglu", int(_get(config, path, "moe_intermediate_size")), activation),
        "shared_expert": ExpertShape("swiglu", shared_size, activation) if shared_size else None,
        "shared_expert_gated": bool(shared_size),
    }


def _jamba(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Jamba: Qwen-MoE's rule without renormalisation (JambaTopKRouter keeps the top-k probabilities
    as they are), experts `intermediate_size` wide, no shared expert; its Mamba and attention layers
    are not the service's concern."""
    return {
        "num_experts": int(_get(config, path, "num_experts")),
        "routing": RoutingConfig(
            family="qwen_moe",
            top_k=int(_get(config, path, "num_experts_per_tok")),
            normalize_top_k=False,
            weights_in_activation_dtype=True,
        ),
        "expert": ExpertShape("swiglu", int(_get(config, path, "intermediate_size")), _activation(config, path)),
    }


def _olmoe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """OLMoE routes as Qwen-MoE does (its router is the same code in transformers), has no shared
    expert, and its experts' width is `intermediate_size`."""
    return {
        "num_experts": int(_get(config, path, "num_experts", "num_local_experts")),
        "routing": _qwen_routing(config, path),
        "expert": ExpertShape("swiglu", int(_get(config, path, "intermediate_size")), _activation(config, path)),
    }


def _deepseek_v3(config: dict[str, Any], path: Path) -> dict[str, Any]:
    expert_size = int(_get(config, path, "moe_intermediate_size"))
    # EXAONE-MoE names its counts num_experts and num_shared_experts
    shared_count = int(config.get("n_shared_experts") or config.get("num_shared_experts") or 0)
    activation = _activation(config, path)
    num_experts = int(_get(config, path, "n_routed_experts", "num_local_experts", "num_experts"))
    routing = RoutingConfig(
        family="deepseek_v3",
        top_k=int(_get(config, path, "num_experts_per_tok")),
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


def _deepseek_v2(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """DeepSeek-V2 (and V2-Lite): softmax scores, group-limited only with topk_method
    "group_limited_greedy", never renormalised (transformers ignores norm_topk_prob here)."""
    fields = _deepseek_v3(config, path)
    method = config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigurationError(f"{path}: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    fields["routing"] = replace(
        fields["routing"],
        family="deepseek_v2",
        normalize_top_k=False,
        num_groups=fields["routing"].num_groups if grouped else 1,
        top_k_groups=fields["routing"].top_k_groups if grouped else 1,
    )
    return fields


def _minimax_m2(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """MiniMax-M2: DeepSeek-V3's sigmoid scores with a selection bias, renormalised, on logits in the
    activation dtype; no groups, no scaling, no shared expert; experts `intermediate_size` wide."""
    return {
        "num_experts": int(_get(config, path, "num_local_experts")),
        "routing": RoutingConfig(
            family="deepseek_v3", top_k=int(_get(config, path, "num_experts_per_tok")), logits_in_activation_dtype=True
        ),
        "expert": ExpertShape("swiglu", int(_get(config, path, "intermediate_size")), _activation(config, path)),
    }


def _ernie4_5_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """ERNIE-4.5-MoE: float32 softmax; top-k of the probabilities plus the selection bias; the chosen
    probabilities renormalised (sum clamped to moe_norm_min), cast to the activation dtype;
    moe_num_shared_experts shared experts (one MLP that many experts wide) added."""
    if config.get("use_bias"):
        raise ConfigurationError(f"{path}: use_bias=true (biased shared-expert projections) is not supported")
    expert_size = int(_get(config, path, "moe_intermediate_size"))
    shared_count = int(config.get("moe_num_shared_experts") or 0)
    activation = _activation(config, path)
    routing = RoutingConfig(
        family="ernie4_5_moe",
        top_k=int(_get(config, path, "moe_k", "num_experts_per_tok")),
        weights_in_activation_dtype=True,
        norm_min=float(config.get("moe_norm_min", 1e-12)),
    )
    return {
        "num_experts": int(_get(config, path, "moe_num_experts", "num_experts")),
        "routing": routing,
        "expert": ExpertShape("swiglu", expert_size, activation),
        "shared_expert": ExpertShape("swiglu", expert_size * shared_count, activation) if shared_count else None,
    }


def _lfm2_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """LFM2-MoE: sigmoid scores in the activation dtype, expert_bias for choice only (use_expert_bias),
    renormalised (sum + 1e-6) when norm_topk_prob, x routed_scaling_factor; SiLU experts, no shared one."""
    routing = RoutingConfig(
        family="lfm2_moe",
        top_k=int(_get(config, path, "num_experts_per_tok")),
        normalize_top_k=bool(config.get("norm_topk_prob", True)),
        routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        weights_in_activation_dtype=True,
    )
    return {
        "num_experts": int(_get(config, path, "num_experts")),
        "routing": routing,
        # Lfm2MoeExperts applies F.silu whatever the config names
        "expert": ExpertShape("swiglu", int(_get(config, path, "moe_intermediate_size")), "silu"),
    }


def _granitemoe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    # GraniteMoeTopKRouter: top-k of the float32 logits, softmax over the kept k, cast to the activation dtype
    return {
        "num_experts": int(_get(config, path, "num_local_experts")),
        "routing": RoutingConfig(
            family="granitemoe", top_k=int(_get(config, path, "num_experts_per_tok")), weights_in_activation_dtype=True
        ),
        "expert": ExpertShape("swiglu", int(_get(config, path, "intermediate_size")), _activation(config, path)),
    }


def _cohere2_moe(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Cohere2-MoE: top-k of the logits, then softmax over the kept k (Granite-MoE's rule) or, with
    expert_selection_fn "sigmoid", their sigmoids renormalised when norm_topk_prob; num_shared_experts
    shared experts (one MLP that many experts wide) added to the routed output ("sum") or averaged with it."""
    selection = config.get("expert_selection_fn", "softmax")
    if selection not in ("softmax", "sigmoid"):
        raise ConfigurationError(f"{path}: expert_selection_fn {selection!r} is not softmax or sigmoid")
    shared_count = int(config.get("num_shared_experts") or 0)
    strategy = config.get("shared_expert_combination_strategy", "average")
    if shared_count and strategy not in ("sum", "average"):
        raise ConfigurationError(f"{path}: shared_expert_combination_strategy {strategy!r} is not sum or average")
    expert_size = int(_get(config, path, "intermediate_size"))
    activation = _activation(config, path)
    routing = RoutingConfig(
        family="granitemoe",
        top_k=int(_get(config, path, "num_experts_per_tok")),
        normalize_top_k=selection == "sigmoid" and bool(config.get("norm_topk_prob", True)),
        weights_in_activation_dtype=True,
        sigmoid_top_k=selection == "sigmoid",
        output_scale=0.5 if shared_count and strategy == "average" else 1.0,
    )
    return {
        "num_experts": int(_get(config, path, "num_experts")),
        "routing": routing,
        "expert": ExpertShape("swiglu", expert_size, activation),
        "shared_expert": ExpertShape("swiglu", expert_size * shared_count, activation) if shared_count else None,
    }


def _switch(config: dict[str, Any], path: Path) -> dict[str, Any]:
    if config.get("router_dtype", "float32") != "float32":
        raise ConfigurationError(f"{path}: only router_dtype float32 is supported")
    return {
        "hidden_size": int(_get(config, path, "d_model")),
        "num_experts": int(_get(config, path, "num_experts")),
        "routing": RoutingConfig(family="switch", top_k=1, weights_in_activation_dtype=True),
        "expert": ExpertShape("dense", int(_get(config, path, "d_ff")), _activation(config, path, "dense_act_fn")),
        "default_expert_capacity": int(config.get("expert_capacity") or 0),
        "num_encoder_layers": int(config.get("num_layers", 0)),
        "num_layers": int(config.get("num_layers", 0)) + int(config.get("num_decoder_layers") or 0),
    }


FAMILY_PARSERS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "qwen3_next": _qwen_moe,
    "jamba": _jamba,  # Qwen3-Next's MoE block and router are Qwen2-MoE's (renormalised)
    "minimax": _mixtral,  # MiniMax-Text-01's router and experts are Mixtral's
    "olmoe": _olmoe,
    "flex_olmo": _olmoe,  # FlexOlmo's router and experts are OLMoE's
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    # GLM-4.5's MoE block and router are DeepSeek-V3's (transformers generates one from the other)
    "glm4_moe": _deepseek_v3,
    # GLM-4.7-Flash, Solar Open and EXAONE-MoE: DeepSeek-V3's router, experts and shared experts again
    "glm4_moe_lite": _deepseek_v3,
    "solar_open": _deepseek_v3,
    "exaone_moe": _deepseek_v3,
    "minimax_m2": _minimax_m2,
    "dots1": _deepseek_v3,  # dots.llm1: DeepSeek-V3's router, shared experts and dense first layers
    "ernie4_5_moe": _ernie4_5_moe,
    "lfm2_moe": _lfm2_moe,
    "granitemoe": _granitemoe,
    "cohere2_moe": _cohere2_moe,
    "switch_transformers": _switch,
}


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
    parser = FAMILY_PARSERS.get(model_type)
    if parser is None:
        supported = ", ".join(sorted(FAMILY_PARSERS))
        raise ConfigurationError(
            f"{path}: model_type {model_type!r} is not a supported MoE family (supported: {supported})"
        )
    fields = {
        "hidden_size": config.get("hidden_size"),
        "num_layers": int(config.get("num_hidden_layers", 1)),
        **parser(config, path),
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


def load_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigurationError(f"{directory} is not a Hugging Face checkpoint: no config.json there")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{path} is not valid JSON: {error}") from None
