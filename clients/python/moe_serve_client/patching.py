"""`patch_model`: swap every MoE block of a loaded transformers model for a `RemoteMoE` served by a gateway.

Supported: the causal LMs (or their base models) of SUPPORTED_MODEL_TYPES (Mixtral, MiniMax-Text-01, MiniMax-M2,
Qwen2/3-MoE, Qwen3-Next, Jamba, OLMoE, FlexOlmo, DeepSeek-V2/V3, GLM-4.5, GLM-4.7-Flash, dots.llm1, Solar Open,
EXAONE-MoE, ERNIE-4.5-MoE, LFM2-MoE, Granite-MoE, Cohere2-MoE), whose decoder layer i keeps its MoE
block at `layers[i].mlp` (`block_sparse_moe` in Granite-MoE, `feed_forward` in Jamba and LFM2-MoE). A layer
is an MoE layer when that block has a child of the family's router class (the class transformers records
router logits from); dense layers (`mlp_only_layers`, `decoder_sparse_step`, `first_k_dense_replace`) are
left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from torch import nn

from moe_serve_client.channel import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve_client.clients import MoEClient
from moe_serve_client.protocol import GatewayError, ServedModelMetadata
from moe_serve_client.remote_moe import RemoteMoE


class ModelMismatch(ValueError):
    """The model being patched and the model the gateway serves differ (or the served name is unknown)."""


@dataclass(frozen=True)
class FamilySupport:
    """How one transformers model_type maps to moe-serve.

    served_family: the `family` the gateway reports for it in ModelMetadata.
    router_logits_in_float32: its router computes logits in float32 whatever the activation dtype.
    """

    served_family: str
    router_logits_in_float32: bool = False
    block_attribute: str = "mlp"  # where a decoder layer keeps its MoE block


SUPPORTED_MODEL_TYPES: dict[str, FamilySupport] = {
    "mixtral": FamilySupport("mixtral"),
    "qwen2_moe": FamilySupport("qwen_moe"),
    "qwen3_moe": FamilySupport("qwen_moe"),
    "qwen3_next": FamilySupport("qwen_moe"),
    "minimax": FamilySupport("mixtral"),
    "olmoe": FamilySupport("qwen_moe"),
    "flex_olmo": FamilySupport("qwen_moe"),
    "jamba": FamilySupport("qwen_moe", block_attribute="feed_forward"),
    # DeepSeek-V2/V3's routers (copied by GLM-4.5 and dots.llm1):
    # F.linear(hidden.type(torch.float32), weight.type(torch.float32))
    "deepseek_v2": FamilySupport("deepseek_v2", router_logits_in_float32=True),
    "deepseek_v3": FamilySupport("deepseek_v3", router_logits_in_float32=True),
    "glm4_moe": FamilySupport("deepseek_v3", router_logits_in_float32=True),
    "dots1": FamilySupport("deepseek_v3", router_logits_in_float32=True),
    "glm4_moe_lite": FamilySupport("deepseek_v3", router_logits_in_float32=True),
    "solar_open": FamilySupport("deepseek_v3", router_logits_in_float32=True),
    "exaone_moe": FamilySupport("deepseek_v3", router_logits_in_float32=True),
    # MiniMaxM2TopKRouter: DeepSeek-V3's routing on logits in the activation dtype
    "minimax_m2": FamilySupport("deepseek_v3"),
    # Ernie4_5_MoeTopKRouter: F.linear(hidden_states.float(), self.weight.float())
    "ernie4_5_moe": FamilySupport("ernie4_5_moe", router_logits_in_float32=True),
    "lfm2_moe": FamilySupport("lfm2_moe", block_attribute="feed_forward"),
    # GraniteMoeTopKRouter returns F.linear(...).float(): logits in the activation dtype, cast to float32
    "granitemoe": FamilySupport("granitemoe", router_logits_in_float32=True, block_attribute="block_sparse_moe"),
    # Cohere2MoeTopKRouter: Granite-MoE's rule (or its sigmoid variant), logits left in the activation dtype
    "cohere2_moe": FamilySupport("granitemoe"),
}


def router_recorder(model: nn.Module) -> tuple[type[nn.Module], int]:
    """(router class, index of the logits in its output) from the model's `_can_record_outputs`."""
    recorder = getattr(model, "_can_record_outputs", {}).get("router_logits")
    target_class = getattr(recorder, "target_class", None)
    if target_class is None:
        raise ValueError(f"{type(model).__name__} does not record router logits from a router module class")
    return target_class, int(getattr(recorder, "index", 0))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers` of a causal LM, or `model.layers` of a base model."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers or .layers")
    return layers


def block_attribute(model: nn.Module) -> str:
    """The attribute of a decoder layer that holds its MoE (or dense) feed-forward block."""
    support = SUPPORTED_MODEL_TYPES.get(model.config.model_type)
    return support.block_attribute if support is not None else "mlp"


def moe_layer_indices(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose feed-forward block is an MoE block (holds a router)."""
    router_class, _ = router_recorder(model)
    attribute = block_attribute(model)
    return [
        index
        for index, layer in enumerate(decoder_layers(model))
        if any(isinstance(child, router_class) for child in getattr(layer, attribute).children())
    ]


def default_model_name(model: nn.Module) -> str:
    """The gateway's default name for a checkpoint: its directory's name (`name_or_path` of a loaded model)."""
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    name = Path(name_or_path.rstrip("/")).name
    if not name:
        raise ValueError("the model was not loaded from a directory; pass model_name= (the name the gateway serves)")
    return name


def patch_model(
    model: nn.Module,
    url: str | MoEClient,
    model_name: str | None = None,
    *,
    timeout: float | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[int]:
    """Replace every MoE block of `model` in place by a RemoteMoE served at `url`; return the patched layer indices.

    Args:
        model: a loaded model of a SUPPORTED_MODEL_TYPES family (causal LM or base model).
        url: the gateway's "host:port", or a MoEClient to share (one channel for every block).
        model_name: the served model's name. Default: the name of the directory the model was loaded
            from, which is what `moe-serve up --checkpoint DIR` serves unless given `--model-name`.
        timeout: deadline of each gateway call in seconds (None: the gateway's default).
        max_message_bytes: message size limit of the channel created for `url`.

    Raises:
        ModelMismatch: the gateway does not serve `model_name`, or its hidden size, family, MoE layers,
            expert count or top-k differ from the model's. Nothing is patched then.
        GatewayError: the gateway could not be asked (e.g. UNAVAILABLE).
        ValueError: the model's family is not supported.
    """
    config = model.config
    support = SUPPORTED_MODEL_TYPES.get(config.model_type)
    if support is None:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise ValueError(f"model_type {config.model_type!r} is not supported by patch_model (supported: {supported})")
    router_class, router_index = router_recorder(model)
    layers = decoder_layers(model)
    moe_layers = moe_layer_indices(model)
    attribute = support.block_attribute
    if not moe_layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers (none of its layers' {attribute} holds a router)")
    routers = [
        child for child in getattr(layers[moe_layers[0]], attribute).children() if isinstance(child, router_class)
    ]
    name = model_name or default_model_name(model)
    client = url if isinstance(url, MoEClient) else MoEClient(url, max_message_bytes)
    try:
        metadata = served_metadata(client, name, timeout)
        check_matches(
            metadata,
            model_description=f"{type(model).__name__} ({config.model_type})",
            served_family=support.served_family,
            hidden_size=config.hidden_size,
            moe_layers=moe_layers,
            num_experts=int(getattr(routers[0], "num_experts", 0) or routers[0].weight.shape[0]),
            top_k=getattr(config, "num_experts_per_tok", None),
        )
    except Exception:
        if client is not url:  # nothing will use the channel we opened
            client.close()
        raise
    for index in moe_layers:
        remote = RemoteMoE(
            getattr(layers[index], attribute),
            layer_idx=index,
            client=client,
            model_name=metadata.name,
            router_class=router_class,
            router_output_index=router_index,
            router_logits_in_float32=support.router_logits_in_float32,
            timeout=timeout,
        )
        setattr(layers[index], attribute, remote)
    return moe_layers


def served_metadata(client: MoEClient, model_name: str, timeout: float | None) -> ServedModelMetadata:
    """ModelMetadata of `model_name`; an unknown name becomes ModelMismatch with the gateway's message (it names
    the model it serves)."""
    try:
        return client.model_metadata(model_name, timeout=timeout)
    except GatewayError as error:
        if error.status_code == grpc.StatusCode.NOT_FOUND:
            raise ModelMismatch(
                f"the gateway at {client.address} does not serve {model_name!r}: {error.message}"
            ) from None
        raise


def check_matches(
    metadata: ServedModelMetadata,
    *,
    model_description: str,
    served_family: str,
    hidden_size: int,
    moe_layers: list[int],
    num_experts: int | None,
    top_k: int | None,
) -> None:
    """Raise ModelMismatch naming every difference between the served model and the local one."""
    if metadata.moe_layers is None:
        raise ModelMismatch(
            f"model {metadata.name!r} reports no moe_layers in its ModelMetadata parameters (not a moe-serve gateway?)"
        )
    comparisons: list[tuple[str, object, object]] = [
        ("hidden size", metadata.hidden_size, hidden_size),
        ("MoE layers", list(metadata.moe_layers), moe_layers),
        ("routing family", metadata.family, served_family),
    ]
    if num_experts is not None and metadata.num_experts is not None:
        comparisons.append(("routed experts", metadata.num_experts, num_experts))
    if top_k is not None and metadata.top_k is not None:
        comparisons.append(("experts per token", metadata.top_k, top_k))
    differences = [f"{what}: served {served}, local {local}" for what, served, local in comparisons if served != local]
    if differences:
        raise ModelMismatch(
            f"the served model {metadata.name!r} does not match this {model_description}: " + "; ".join(differences)
        )
