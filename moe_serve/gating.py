"""Router gating math: hidden states -> (router logits, top-k expert ids, combine weights).

Each family is computed exactly as its `transformers` module does, so the served layer picks
the same experts as the model. Everything after the logits (softmax, top-k, renormalisation)
runs in float32 whatever the activation dtype; the logits matmul itself runs in the dtype the
model runs it in (Mixtral: the activation dtype, then upcast), because a different rounding of
the logits would flip near-tied top-k choices and the served layer would no longer equal the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.model_spec import RoutingConfig


@dataclass(frozen=True)
class GatingResult:
    """Routing of T tokens.

    router_logits: [T, E] float32, the model's router logits.
    selection_scores: [T, E] float32, what top-k selection ranked (probabilities for Mixtral);
        used to find a token's next-best expert.
    expert_ids: [T, k] int64, chosen experts in the model's top-k order.
    expert_weights: [T, k] float32, combine weights of the chosen experts.
    """

    router_logits: torch.Tensor
    selection_scores: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor


def compute_gating(hidden_states: torch.Tensor, gate_weight: torch.Tensor, routing: RoutingConfig) -> GatingResult:
    """Gate `hidden_states` [T, d] with router weight `gate_weight` [E, d] under `routing`."""
    if routing.family == "mixtral":
        return _softmax_top_k(hidden_states, gate_weight, routing)
    raise ValueError(f"no gating rule for routing family {routing.family!r}")


def _softmax_top_k(hidden_states: torch.Tensor, gate_weight: torch.Tensor, routing: RoutingConfig) -> GatingResult:
    # MixtralTopKRouter: logits in the activation dtype, softmax/top-k/renormalise in float32
    logits = F.linear(hidden_states, gate_weight.to(hidden_states.dtype)).float()
    probabilities = torch.softmax(logits, dim=-1)
    top_weights, top_ids = torch.topk(probabilities, routing.top_k, dim=-1)
    if routing.normalize_top_k:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return GatingResult(
        router_logits=logits, selection_scores=probabilities, expert_ids=top_ids, expert_weights=top_weights
    )
