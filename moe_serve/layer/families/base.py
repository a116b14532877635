"""What a model family declares: its `model_type`s, its config reader and its router weight names.

A family module builds one or more `Family` values; `registry.py` collects them. The routing
mechanism a family uses is named in the `RoutingConfig` its config reader returns (see
`moe_serve.model_spec.RoutingMechanism`); the mechanism's math lives in `moe_serve.layer.gating`,
so one mechanism serves every family that routes that way, as vLLM's router factory picks a router
class by mechanism rather than by model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_serve.model_spec import SUPPORTED_ACTIVATIONS, MoEModelSpec
from moe_serve.runtime.errors import ConfigurationError

# the keyword fields of MoEModelSpec a config reader fills (hidden_size and num_layers optional)
ConfigReader = Callable[[dict[str, Any], Path], dict[str, Any]]


@dataclass(frozen=True)
class RouterPattern:
    """Where a family's checkpoint keeps the router weight of an MoE layer.

    regex: matches the full router weight name; group `layer` is the block index, group `stack`
        ("encoder" / "decoder", encoder-decoder models only) which stack the block is in.
    router_suffix: the router's module path inside the MoE block, e.g. "gate" or "router.layer";
        the block's prefix is the weight name without ".<router_suffix>.weight".
    """

    regex: re.Pattern[str]
    router_suffix: str

    def locate(self, name: str, spec: MoEModelSpec) -> tuple[int, str, str] | None:
        """(layer index, block prefix, router prefix) of weight `name`, or None when it is not a router."""
        match = self.regex.match(name)
        if match is None:
            return None
        # a decoder block of an encoder-decoder model is numbered after the encoder's blocks
        offset = spec.num_encoder_layers if match.groupdict().get("stack") == "decoder" else 0
        prefix = name.removesuffix(f".{self.router_suffix}.weight")
        return int(match["layer"]) + offset, prefix, f"{prefix}.{self.router_suffix}"


# the decoder MoE block's router as most families name it (Mixtral, Qwen, DeepSeek, ERNIE, LFM2, ...)
DECODER_GATE = RouterPattern(
    re.compile(r"^model\.layers\.(?P<layer>\d+)\.(block_sparse_moe|mlp|feed_forward)\.gate\.weight$"), "gate"
)


@dataclass(frozen=True)
class Family:
    """One model family as served.

    model_types: the config.json `model_type`s this family reads.
    read_config: config.json -> MoEModelSpec fields, its RoutingConfig naming the mechanism.
    router_patterns: where its checkpoints keep each MoE layer's router weight.
    """

    model_types: tuple[str, ...]
    read_config: ConfigReader
    router_patterns: tuple[RouterPattern, ...] = (DECODER_GATE,)


def config_value(config: dict[str, Any], path: Path, *keys: str) -> Any:
    """The first of `keys` present in config.json (families renamed keys across versions)."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    raise ConfigurationError(
        f"{path}: config.json has none of {list(keys)}, which a {config.get('model_type')} MoE checkpoint declares"
    )


def expert_activation(config: dict[str, Any], path: Path, key: str = "hidden_act") -> str:
    """The experts' activation named by `key`, refused when the workers cannot run it."""
    activation = config.get(key, "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigurationError(
            f"{path}: expert activation {activation!r} is not supported ({', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    return activation
