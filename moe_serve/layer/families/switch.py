"""Switch Transformers: `switch_top1`: float32 router (with an optional bias), probabilities rounded to
the activation dtype, argmax, weight = the chosen probability; dense experts (wo(act(wi(x)))), the
model's own expert capacity from `expert_capacity`. An encoder-decoder: decoder block b is layer
`num_layers + b`. Weights: `{encoder|decoder}.block.N.layer.M.mlp.router.classifier` and
`experts.expert_J.wi/wo`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moe_serve.layer.families.base import Family, RouterPattern, config_value, expert_activation
from moe_serve.model_spec import ExpertShape, RoutingConfig
from moe_serve.runtime.errors import ConfigurationError

SWITCH_ROUTER = RouterPattern(
    re.compile(r"^(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.(\d+)\.mlp\.router\.classifier\.weight$"),
    "router.classifier",
)


def read_switch(config: dict[str, Any], path: Path) -> dict[str, Any]:
    if config.get("router_dtype", "float32") != "float32":
        raise ConfigurationError(f"{path}: only router_dtype float32 is supported")
    return {
        "hidden_size": int(config_value(config, path, "d_model")),
        "num_experts": int(config_value(config, path, "num_experts")),
        "routing": RoutingConfig(family="switch", top_k=1, mechanism="switch_top1", weights_in_activation_dtype=True),
        "expert": ExpertShape(
            "dense", int(config_value(config, path, "d_ff")), expert_activation(config, path, "dense_act_fn")
        ),
        "default_expert_capacity": int(config.get("expert_capacity") or 0),
        "num_encoder_layers": int(config.get("num_layers", 0)),
        "num_layers": int(config.get("num_layers", 0)) + int(config.get("num_decoder_layers") or 0),
    }


SWITCH = Family(model_types=("switch_transformers",), read_config=read_switch, router_patterns=(SWITCH_ROUTER,))
