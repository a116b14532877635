"""Placement plan: which worker holds which (layer, expert) pairs.

Experts are split into contiguous, balanced blocks by expert id, and a worker holds its block
for every MoE layer, so the k experts of one token tend to sit on different workers and run in
parallel. With more workers than experts, the extra workers hold replicas, round-robin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class ExpertKey(NamedTuple):
    layer: int
    expert: int


@dataclass(frozen=True)
class WorkerAssignment:
    """The experts one worker loads and serves."""

    worker_index: int
    experts: tuple[ExpertKey, ...]

    def expert_ids(self) -> list[int]:
        return sorted({key.expert for key in self.experts})


def expert_blocks(num_experts: int, num_workers: int) -> list[list[int]]:
    """Expert ids per worker: balanced contiguous blocks, or round-robin replicas beyond E workers."""
    if num_experts < 1 or num_workers < 1:
        raise ValueError(f"need at least one expert and one worker (got E={num_experts}, workers={num_workers})")
    if num_workers >= num_experts:
        return [[worker % num_experts] for worker in range(num_workers)]
    base, extra = divmod(num_experts, num_workers)
    blocks, start = [], 0
    for worker in range(num_workers):
        size = base + (1 if worker < extra else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


def plan_placement(
    moe_layers: tuple[int, ...] | list[int], num_experts: int, num_workers: int
) -> list[WorkerAssignment]:
    """Assign every (layer, expert) to at least one of `num_workers` workers."""
    if not moe_layers:
        raise ValueError("the checkpoint has no MoE layer to place")
    return [
        WorkerAssignment(
            worker_index=index,
            experts=tuple(ExpertKey(layer, expert) for layer in moe_layers for expert in block),
        )
        for index, block in enumerate(expert_blocks(num_experts, num_workers))
    ]


def parse_expert_ids(text: str) -> list[int]:
    """Parse an expert list such as "0-3,6" into [0, 1, 2, 3, 6]."""
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"bad expert list {text!r}: expected e.g. '0-3,6'") from None
        if first > last or first < 0:
            raise ValueError(f"bad expert range {part!r} in {text!r}")
        ids.update(range(first, last + 1))
    if not ids:
        raise ValueError(f"expert list {text!r} names no expert")
    return sorted(ids)


def parse_expert_keys(text: str, moe_layers: tuple[int, ...] | list[int]) -> list[ExpertKey]:
    """Parse an expert list into keys: "0-3,6" (those experts in every MoE layer) and/or "1:3" or "1:2-4"
    (experts of one layer only)."""
    keys: set[ExpertKey] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, colon, experts = part.rpartition(":")
        if colon:
            try:
                layers = [int(layer)]
            except ValueError:
                raise ValueError(f"bad layer {layer!r} in {text!r}: expected e.g. '1:3'") from None
        else:
            layers, experts = list(moe_layers), part
        keys.update(ExpertKey(layer_index, expert) for layer_index in layers for expert in parse_expert_ids(experts))
    if not keys:
        raise ValueError(f"expert list {text!r} names no expert")
    return sorted(keys)
