"""Expert capacity: how many rows each expert may take from one dispatch batch, and what overflows.

Priority is the published rule (GShard, Switch Transformer): slots are ranked first by their
top-k position (every first choice before any second choice), then by token position in the
batch; an expert takes the first `capacity` slots offered to it. What happens to the others is
the overflow rule:
- `drop`: the slot contributes zero (the token's residual carries it), as in Switch/GShard;
- `reroute`: after every original choice has been placed, overflow slots, in priority order, go
  to their token's next-best expert that still has room (and that the token does not already
  use); a slot with no such expert is dropped. Weights are then renormalised over what was kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

UNLIMITED = 0
OverflowRule = Literal["drop", "reroute"]


def compute_expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * tokens * k / E); UNLIMITED (0) when capacity_factor is 0 (dropless)."""
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor must be >= 0, got {capacity_factor}")
    if capacity_factor == 0:
        return UNLIMITED
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def slot_priority_ranks(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] int64: each slot's 0-based place in its expert's queue under the priority rule."""
    num_tokens, top_k = expert_ids.shape
    # slot-major order: every token's first choice, then every token's second choice, ...
    ordered = expert_ids.t().reshape(-1)
    sorted_experts, permutation = torch.sort(ordered, stable=True)
    counts = torch.bincount(sorted_experts, minlength=num_experts)
    group_starts = torch.cumsum(counts, 0) - counts
    ranks_sorted = torch.arange(ordered.numel()) - group_starts[sorted_experts]
    ranks = torch.empty_like(ranks_sorted)
    ranks[permutation] = ranks_sorted
    return ranks.view(top_k, num_tokens).t()


def keep_within_capacity(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[T, k] bool: slots kept when every expert takes at most `capacity` rows (UNLIMITED keeps all)."""
    if capacity == UNLIMITED:
        return torch.ones_like(expert_ids, dtype=torch.bool)
    return slot_priority_ranks(expert_ids, num_experts) < capacity


@dataclass(frozen=True)
class CapacityOutcome:
    """The slots of a batch after the capacity rule.

    expert_ids: [T, k] final experts (a rerouted slot holds its new expert).
    kept: [T, k] slots that go to an expert (original or rerouted).
    rerouted: [T, k] slots moved to another expert.
    original_ids: [T, k] the experts gating chose, for attributing overflow.
    """

    expert_ids: torch.Tensor
    kept: torch.Tensor
    rerouted: torch.Tensor
    original_ids: torch.Tensor

    @property
    def dropped(self) -> torch.Tensor:
        return ~self.kept


def apply_capacity(
    expert_ids: torch.Tensor, selection_scores: torch.Tensor, capacity: int, rule: OverflowRule
) -> CapacityOutcome:
    """Apply `capacity` (UNLIMITED: nothing overflows) with the overflow `rule`."""
    num_experts = selection_scores.shape[-1]
    kept = keep_within_capacity(expert_ids, num_experts, capacity)
    no_reroute = torch.zeros_like(kept)
    if rule == "drop" or bool(kept.all()):
        return CapacityOutcome(expert_ids, kept, no_reroute, expert_ids)
    final_ids, rerouted = _reroute_overflow(expert_ids, kept, selection_scores, capacity)
    return CapacityOutcome(final_ids, kept | rerouted, rerouted, expert_ids)


def _reroute_overflow(
    expert_ids: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each overflow slot, in priority order, to its token's best expert that still has room.

    Only overflow slots are visited, one by one (they are few once capacity is sensible); the
    candidates are a token's experts by descending selection score, skipping those it already
    uses and those the router would never pick (score -inf, e.g. outside DeepSeek's groups).
    """
    num_tokens, top_k = expert_ids.shape
    ids = expert_ids.numpy().copy()
    room = capacity - np.bincount(ids[kept.numpy()], minlength=scores.shape[-1])
    ranking = torch.argsort(scores, dim=-1, descending=True, stable=True).numpy()
    finite = torch.isfinite(scores).numpy()
    rerouted = np.zeros((num_tokens, top_k), dtype=bool)
    overflow = (~kept).t().nonzero().numpy()  # slot-major: the priority order
    for slot, token in overflow:
        used = set(ids[token].tolist())
        for expert in ranking[token]:
            if room[expert] > 0 and expert not in used and finite[token, expert]:
                ids[token, slot] = expert
                room[expert] -= 1
                rerouted[token, slot] = True
                break
    return torch.from_numpy(ids), torch.from_numpy(rerouted)


def combine_weights(
    outcome: CapacityOutcome, weights: torch.Tensor, weight_scores: torch.Tensor, rule: OverflowRule
) -> torch.Tensor:
    """[T, k] float32 combine weights after the capacity rule (0 for a dropped slot).

    weights: the gating weights of the original choices; weight_scores: [T, E] the per-expert
    score a weight is made of (a rerouted slot takes its new expert's). Under `reroute` each
    token's kept weights are renormalised to the total its original weights had; under `drop`
    the kept slots keep their weights unchanged, as in Switch/GShard.
    """
    zero = torch.zeros((), dtype=weights.dtype)
    if rule == "drop" or not bool((outcome.rerouted | outcome.dropped).any()):
        return torch.where(outcome.kept, weights, zero)
    raw = torch.where(outcome.rerouted, weight_scores.gather(1, outcome.expert_ids), weights)
    kept = torch.where(outcome.kept, raw, zero)
    kept_total = kept.sum(dim=-1, keepdim=True)
    scale = weights.sum(dim=-1, keepdim=True) / kept_total.clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.where(kept_total > 0, kept * scale, zero)
