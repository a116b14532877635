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


# up to this many slots (a decode step's few tokens) the grouping runs on Python lists: five small
# tensor ops cost about 40 us there, the lists a few (same result: stable by position within an expert)
FEW_SLOTS = 64


def group_by_expert(expert_ids: torch.Tensor, kept: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Group the kept slots of `expert_ids` [T, k] by expert."""
    if expert_ids.numel() <= FEW_SLOTS:
        return _group_few(expert_ids.reshape(-1).tolist(), kept.reshape(-1).tolist(), num_experts)
    return _group_many(expert_ids, kept, num_experts)


def _group_many(expert_ids: torch.Tensor, kept: torch.Tensor, num_experts: int) -> ExpertGroups:
    flat_experts = expert_ids.reshape(-1)
    kept_positions = torch.nonzero(kept.reshape(-1)).flatten()
    kept_experts = flat_experts[kept_positions]
    order = torch.sort(kept_experts, stable=True).indices
    counts = torch.bincount(kept_experts, minlength=num_experts)
    return ExpertGroups(positions=kept_positions[order], counts=counts, offsets=torch.cumsum(counts, 0) - counts)


def _group_few(experts: list[int], kept: list[bool], num_experts: int) -> ExpertGroups:
    ordered = sorted(
        (expert, position) for position, (expert, keep) in enumerate(zip(experts, kept, strict=True)) if keep
    )
    counts = [0] * num_experts
    for expert, _ in ordered:
        counts[expert] += 1
    offsets, start = [], 0
    for count in counts:
        offsets.append(start)
        start += count
    return ExpertGroups(
        positions=torch.tensor([position for _, position in ordered], dtype=torch.int64),
        counts=torch.tensor(counts, dtype=torch.int64),
        offsets=torch.tensor(offsets, dtype=torch.int64),
    )


def token_indices(positions: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token index of each flat slot position."""
    return torch.div(positions, top_k, rounding_mode="floor")
