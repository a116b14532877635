"""Dispatch: group the kept (token, slot) pairs by expert, vectorised (sort + bincount).

A slot is addressed by its flat position `token * k + slot`; that position travels with the
row to the worker and back, so the combine step needs nothing else to place the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertGroups:
    """Kept slots grouped by expert.

    positions: [n] int64 flat slot positions, ordered by expert id (then by position).
    counts: [E] int64 rows per expert; expert e owns positions[offsets[e]:offsets[e] + counts[e]].
    offsets: [E] int64 start of each expert's segment.
    """

    positions: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    def segment(self, expert: int) -> torch.Tensor:
        start = int(self.offsets[expert])
        return self.positions[start : start + int(self.counts[expert])]

    def active_experts(self) -> list[int]:
        return torch.nonzero(self.counts).flatten().tolist()


def group_by_expert(expert_ids: torch.Tensor, kept: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Group the kept slots of `expert_ids` [T, k] by expert."""
    flat_experts = expert_ids.reshape(-1)
    kept_positions = torch.nonzero(kept.reshape(-1)).flatten()
    kept_experts = flat_experts[kept_positions]
    order = torch.sort(kept_experts, stable=True).indices
    counts = torch.bincount(kept_experts, minlength=num_experts)
    return ExpertGroups(positions=kept_positions[order], counts=counts, offsets=torch.cumsum(counts, 0) - counts)


def token_indices(positions: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token index of each flat slot position."""
    return torch.div(positions, top_k, rounding_mode="floor")
