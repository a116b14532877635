"""The served algorithm in one process, with the services' own pieces: planner, expert FFN, combine."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from expert_service.experts import ExpertStore
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.placement import ExpertKey
from moe_serve.layer.combine import CombineBuffer
from moe_serve.layer.dispatch import token_indices
from moe_serve.model_spec import MoEModelSpec
from router_service.planner import RoutingDecision, RoutingPlanner


class LocalServedLayers:
    """The router's planner and a worker's expert store for `layers` (default: every MoE layer) of the
    checkpoint at `directory`, computing in `dtype`; `compute` serves one layer as the stack does."""

    def __init__(self, directory: Path, dtype: torch.dtype, layers: Iterable[int] | None = None) -> None:
        self.spec: MoEModelSpec = Checkpoint(directory).spec
        self.planner = RoutingPlanner(Checkpoint(directory), dtype)
        layers = self.spec.moe_layers if layers is None else tuple(layers)
        keys = [ExpertKey(layer, e) for layer in layers for e in range(self.spec.num_placed_experts)]
        self.store = ExpertStore(Checkpoint(directory), keys, dtype, torch.device("cpu"))

    def compute(
        self, layer: int, hidden: torch.Tensor, capacity: int = 0, overflow: str = "drop"
    ) -> tuple[torch.Tensor, RoutingDecision]:
        spec = self.spec
        decision = self.planner.decide(hidden, layer, capacity, overflow)
        buffer = CombineBuffer(hidden.shape[0], decision.slots_per_token, spec.hidden_size, hidden.dtype)
        for expert in decision.groups.active_experts():
            positions = decision.groups.segment(expert)
            rows = hidden[token_indices(positions, decision.slots_per_token)]
            buffer.add(positions, self.store.compute(ExpertKey(layer, expert), rows))
        output = buffer.combine(
            decision.expert_weights, decision.gating.shared_weights, spec.routing.weights_in_activation_dtype
        )
        return output, decision


def local_layer(
    directory, layer: int, hidden: torch.Tensor, capacity: int = 0, overflow: str = "drop"
) -> tuple[torch.Tensor, RoutingDecision]:
    return LocalServedLayers(directory, hidden.dtype, layers=(layer,)).compute(layer, hidden, capacity, overflow)
