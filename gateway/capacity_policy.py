"""The gateway's capacity policy: what limit and overflow rule each dispatch batch gets.

Resolution: `overflow=dropless` means no limit; an explicit `expert_capacity` (rows per expert
per batch) or `capacity_factor` (C = ceil(factor * T * k / E)) sets the limit, with `overflow`
(default `drop`) deciding what happens past it. With nothing configured the model's own
behaviour applies: Switch Transformers drop at the `expert_capacity` of their config, every
other family is dropless, so the served layer equals the model unless the operator asks.
Capacity is computed over the batch actually dispatched: with cross-request batching, over the
whole batch, exactly as a model sees one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_serve.layer.capacity import UNLIMITED, OverflowRule, compute_expert_capacity

OverflowSetting = Literal["drop", "reroute", "dropless"]


@dataclass(frozen=True)
class CapacityPolicy:
    """capacity_factor or expert_capacity (absolute) or neither (dropless); overflow rule."""

    capacity_factor: float = 0.0
    expert_capacity: int = 0
    overflow: OverflowRule = "drop"
    dropless: bool = True

    @classmethod
    def resolve(
        cls,
        capacity_factor: float | None,
        expert_capacity: int | None,
        overflow: OverflowSetting | None,
        model_default_capacity: int,
    ) -> CapacityPolicy:
        if overflow == "dropless":
            return cls()
        rule: OverflowRule = overflow or "drop"
        if expert_capacity:
            return cls(expert_capacity=expert_capacity, overflow=rule, dropless=False)
        if capacity_factor:
            return cls(capacity_factor=capacity_factor, overflow=rule, dropless=False)
        if overflow is not None:  # a rule was asked for without a size: the common factor 1.0
            return cls(capacity_factor=1.0, overflow=rule, dropless=False)
        if model_default_capacity:
            return cls(expert_capacity=model_default_capacity, overflow="drop", dropless=False)
        return cls()

    def limit(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        """Rows per expert for a batch of `num_tokens` (UNLIMITED when dropless)."""
        if self.dropless:
            return UNLIMITED
        if self.expert_capacity:
            return self.expert_capacity
        return compute_expert_capacity(num_tokens, top_k, num_experts, self.capacity_factor)

    def describe(self) -> dict[str, str | float | int]:
        """Reported in ModelMetadata parameters."""
        if self.dropless:
            return {"overflow": "dropless", "capacity_factor": 0.0, "expert_capacity": 0}
        return {
            "overflow": self.overflow,
            "capacity_factor": self.capacity_factor,
            "expert_capacity": self.expert_capacity,
        }
