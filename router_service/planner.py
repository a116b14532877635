"""Routing decisions: gate a batch, apply the capacity the gateway asked for, group rows per worker.

Protocol-neutral: tensors in, tensors and plain objects out; the servicer does the protobuf.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_serve.capacity import keep_within_capacity
from moe_serve.checkpoint import Checkpoint
from moe_serve.dispatch import ExpertGroups, group_by_expert, token_indices
from moe_serve.errors import ExpertUnavailable, InvalidInput
from moe_serve.gating import GatingResult, compute_gating
from moe_serve.model_spec import MoEModelSpec
from moe_serve.placement import ExpertKey
from moe_serve.registry import Registry, WorkerRecord


@dataclass(frozen=True)
class RoutingDecision:
    """Gating of one dispatch batch after the capacity rule.

    kept: [T, k] bool, slots that go to an expert.
    expert_weights: [T, k] float32 combine weights, 0 where a slot was dropped.
    """

    layer: int
    gating: GatingResult
    kept: torch.Tensor
    expert_weights: torch.Tensor
    groups: ExpertGroups


@dataclass(frozen=True)
class WorkerBatch:
    """Rows for one worker: consecutive segments, one per expert."""

    worker: WorkerRecord
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    positions: torch.Tensor  # [n] int64 flat slot positions

    @property
    def num_rows(self) -> int:
        return int(self.positions.numel())


class RoutingPlanner:
    """Holds the router weights of every MoE layer and makes routing decisions."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        self.spec: MoEModelSpec = checkpoint.spec
        self.dtype = dtype
        self.gate_weights = {layer: checkpoint.gate_weight(layer).to(dtype).clone() for layer in self.spec.moe_layers}
        checkpoint.close()

    def decide(self, hidden_states: torch.Tensor, layer: int, expert_capacity: int) -> RoutingDecision:
        """Gate `hidden_states` [T, d] for `layer` and keep at most `expert_capacity` rows per expert."""
        gate_weight = self.gate_weights.get(layer)
        if gate_weight is None:
            raise InvalidInput(f"layer {layer} has no MoE block; MoE layers are {list(self.spec.moe_layers)}")
        if expert_capacity < 0:
            raise InvalidInput(f"expert_capacity must be >= 0, got {expert_capacity}")
        gating = compute_gating(hidden_states, gate_weight, self.spec.routing)
        kept = keep_within_capacity(gating.expert_ids, self.spec.num_experts, expert_capacity)
        weights = torch.where(kept, gating.expert_weights, torch.zeros((), dtype=torch.float32))
        groups = group_by_expert(gating.expert_ids, kept, self.spec.num_experts)
        return RoutingDecision(layer=layer, gating=gating, kept=kept, expert_weights=weights, groups=groups)


ReplicaLoad = Callable[[WorkerRecord], int]


def choose_replica(replicas: tuple[WorkerRecord, ...], load: ReplicaLoad, rng: random.Random) -> WorkerRecord:
    """Power of two choices: of two random replicas, the one with less outstanding work."""
    if len(replicas) == 1:
        return replicas[0]
    first, second = rng.sample(replicas, 2)
    return first if load(first) <= load(second) else second


def assign_workers(
    layer: int,
    expert_segments: dict[int, torch.Tensor],
    registry: Registry,
    load: ReplicaLoad,
    rng: random.Random,
    excluded: frozenset[str] = frozenset(),
) -> list[WorkerBatch]:
    """Pick a replica for each expert and bundle each worker's experts into one batch.

    expert_segments: expert id -> [n_e] flat positions of its rows.
    excluded: worker ids that just failed, not to be tried again for these rows.
    Raises ExpertUnavailable naming the expert when no live replica is left.
    """
    chosen: dict[str, tuple[WorkerRecord, list[int]]] = {}
    for expert in sorted(expert_segments):
        replicas = tuple(r for r in registry.replicas(ExpertKey(layer, expert)) if r.worker_id not in excluded)
        if not replicas:
            raise ExpertUnavailable(
                f"expert {expert} of layer {layer} has no live replica; retry once a worker serving it is back"
            )
        worker = choose_replica(replicas, load, rng)
        chosen.setdefault(worker.worker_id, (worker, []))[1].append(expert)
    batches = []
    for worker, experts in chosen.values():
        segments = [expert_segments[e] for e in experts]
        batches.append(
            WorkerBatch(
                worker=worker,
                experts=tuple(experts),
                counts=tuple(int(s.numel()) for s in segments),
                positions=torch.cat(segments) if len(segments) > 1 else segments[0],
            )
        )
    return batches


def segments_of(groups: ExpertGroups) -> dict[int, torch.Tensor]:
    return {expert: groups.segment(expert) for expert in groups.active_experts()}


def gather_rows(hidden_states: torch.Tensor, positions: torch.Tensor, top_k: int) -> torch.Tensor:
    """The hidden-state rows of the tokens owning `positions` (one copy, in position order)."""
    return hidden_states.index_select(0, token_indices(positions, top_k))
