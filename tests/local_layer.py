"""The served algorithm in one process, with the services' own pieces: planner, expert FFN, combine."""

from __future__ import annotations

import torch

from expert_service.experts import ExpertStore
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.placement import ExpertKey
from moe_serve.layer.combine import CombineBuffer
from moe_serve.layer.dispatch import token_indices
from router_service.planner import RoutingDecision, RoutingPlanner


def local_layer(
    directory, layer: int, hidden: torch.Tensor, capacity: int = 0, overflow: str = "drop"
) -> tuple[torch.Tensor, RoutingDecision]:
    spec = Checkpoint(directory).spec
    planner = RoutingPlanner(Checkpoint(directory), hidden.dtype)
    keys = [ExpertKey(layer, e) for e in range(spec.num_placed_experts)]
    store = ExpertStore(Checkpoint(directory), keys, hidden.dtype, torch.device("cpu"))
    decision = planner.decide(hidden, layer, capacity, overflow)
    buffer = CombineBuffer(hidden.shape[0], decision.slots_per_token, spec.hidden_size, hidden.dtype)
    for expert in decision.groups.active_experts():
        positions = decision.groups.segment(expert)
        rows = hidden[token_indices(positions, decision.slots_per_token)]
        buffer.add(positions, store.compute(ExpertKey(layer, expert), rows))
    output = buffer.combine(
        decision.expert_weights, decision.gating.shared_weights, spec.routing.weights_in_activation_dtype
    )
    return output, decision
