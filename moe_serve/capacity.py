"""Expert capacity: how many rows each expert may take from one dispatch batch, and which slots keep.

The rule is the published one (GShard, Switch Transformer): slots are ranked first by their
top-k position (all first choices before any second choice), then by token position in the
batch; an expert keeps the first `capacity` slots it is offered and drops the rest. A dropped
slot contributes zero; the token's residual connection carries it through the layer.
"""

from __future__ import annotations

import math

import torch

UNLIMITED = 0


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
