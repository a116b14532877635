"""`RemoteMoE`: a drop-in replacement for the MoE block of one decoder layer of a transformers model.

Its forward sends the block's input to the gateway and returns the served output, as the original
block returns its own: a tensor of the input's shape, dtype and device.

Router logits. transformers does not return router logits from the block; with
`output_router_logits=True` it records them with forward hooks on every module of the family's
router class (`_can_record_outputs["router_logits"] = OutputRecorder(MixtralTopKRouter, index=0)`),
installed lazily on the first call that asks. So RemoteMoE keeps, under the original router's
attribute name (`gate`), a stand-in whose class derives from the family's router class: the hooks
find it like the original, and its forward returns the *served* `router_logits` at the recorded
index. Hooks already installed on the original router (the model ran with output_router_logits
before it was patched) are carried over to the stand-in.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from moe_serve_client.clients import MoEClient

# torch keeps module hooks in these dicts; carrying them over keeps the original router's observers
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


class ServedRouterLogits(nn.Module):
    """Base of the router stand-ins: forward(router_logits [T, E]) returns them where the router returned its logits.

    The original routers return (logits, top-k weights, top-k ids); the stand-in returns a tuple of the
    same length with the served logits at `output_index` and None elsewhere (only the logits are used).
    """

    def __init__(self, output_index: int, num_experts: int) -> None:
        # skip the family router's __init__ (it needs a config and allocates the router weights)
        nn.Module.__init__(self)
        self.output_index = output_index
        self.num_experts = num_experts

    def forward(self, router_logits: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        outputs: list[torch.Tensor | None] = [None] * max(3, self.output_index + 1)
        outputs[self.output_index] = router_logits
        return tuple(outputs)


@functools.cache
def served_router_class(router_class: type[nn.Module]) -> type[ServedRouterLogits]:
    """A stand-in class that is also an instance of `router_class`, so transformers' recorders hook it."""
    return type(f"Served{router_class.__name__}", (ServedRouterLogits, router_class), {"__module__": __name__})


def copy_plain_attributes(source: nn.Module, target: nn.Module) -> None:
    """Copy a module's public non-tensor, non-module attributes (top_k, jitter_noise, config, ...)."""
    for name, value in vars(source).items():
        if name.startswith("_") or name == "training" or isinstance(value, torch.Tensor | nn.Module):
            continue
        setattr(target, name, value)


def carry_forward_hooks(source: nn.Module, target: nn.Module) -> None:
    for name in _HOOK_DICTS:
        getattr(target, name).update(getattr(source, name))


class RemoteMoE(nn.Module):
    """The MoE block of decoder layer `layer_idx`, computed by a moe-serve gateway (inference only).

    forward(hidden_states [B, S, d] or [T, d], float32/float16/bfloat16, any device) returns the served
    block output with the same shape, dtype and device, and passes the served router logits ([B*S, E],
    in the dtype the original router computes them in) through the router stand-in for transformers'
    `output_router_logits`. No gradient flows through the remote call. Holds no weights: the original
    block's parameters are not kept, so its `state_dict()` is empty.

    Args:
        block: the original MoE block; only its router's class, attribute name and plain attributes are kept.
        layer_idx: the decoder layer index, sent as the request's `layer` parameter.
        client: the gateway client (share one among all blocks of a model: one channel).
        model_name: the served model's name.
        router_class: the family's router class (what transformers records router logits from).
        router_output_index: where the router's output tuple holds the logits (the recorder's index).
        router_logits_in_float32: the family's router computes logits in float32 whatever the activation
            dtype (DeepSeek-V3); otherwise they are in the activation dtype (Mixtral, Qwen-MoE).
        timeout: deadline of each gateway call in seconds (None: the gateway's default).
    """

    def __init__(
        self,
        block: nn.Module,
        *,
        layer_idx: int,
        client: MoEClient,
        model_name: str,
        router_class: type[nn.Module],
        router_output_index: int = 0,
        router_logits_in_float32: bool = False,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        routers = [(name, child) for name, child in block.named_children() if isinstance(child, router_class)]
        if len(routers) != 1:
            raise ValueError(
                f"{type(block).__name__} has {len(routers)} children of router class {router_class.__name__}; "
                "expected exactly one (is this the MoE block of a supported family?)"
            )
        router_name, router = routers[0]
        num_experts = int(getattr(router, "num_experts", 0) or router.weight.shape[0])
        # the model code may read block attributes such as top_k, jitter_noise or config
        copy_plain_attributes(block, self)
        stand_in = served_router_class(router_class)(router_output_index, num_experts)
        copy_plain_attributes(router, stand_in)
        carry_forward_hooks(router, stand_in)
        self.add_module(router_name, stand_in)
        self._router_name = router_name
        self.layer_idx = layer_idx
        self.client = client
        self.model_name = model_name
        self.router_logits_in_float32 = router_logits_in_float32
        self.timeout = timeout

    @property
    def served_router(self) -> ServedRouterLogits:
        """The router stand-in, under the original router's attribute name (`gate`, or `router` in Granite-MoE)."""
        return getattr(self, self._router_name)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits_dtype = torch.float32 if self.router_logits_in_float32 else hidden_states.dtype
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        if tokens == 0:  # the gateway refuses empty requests; an empty block output needs no experts
            router_logits = hidden_states.new_zeros((0, self.served_router.num_experts), dtype=logits_dtype)
            self.served_router(router_logits)
            return torch.zeros_like(hidden_states)
        served = self.client.infer(
            self.model_name,
            hidden_states,
            layer=self.layer_idx,
            outputs=("output", "router_logits"),
            timeout=self.timeout,
        )
        # copy=True: the served tensors view immutable response bytes; the model may write to its tensors
        output = served["output"].to(device=hidden_states.device, dtype=hidden_states.dtype, copy=True)
        router_logits = served["router_logits"].to(device=hidden_states.device, dtype=logits_dtype, copy=True)
        self.served_router(router_logits)  # runs transformers' recording hooks, in the order the original block did
        return output

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, model_name={self.model_name!r}, gateway={self.client.address!r}"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("RemoteMoE holds an open gRPC channel and cannot be pickled or deep-copied")
