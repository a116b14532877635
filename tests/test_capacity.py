"""Capacity rule: properties checked against a plain-loop reference of the GShard/Switch priority rule."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.capacity import UNLIMITED, compute_expert_capacity, keep_within_capacity


def reference_keep(expert_ids: list[list[int]], capacity: int) -> list[list[bool]]:
    """Slot-major, then token order: first choices of every token, then second choices, ..."""
    used: dict[int, int] = {}
    keep = [[False] * len(row) for row in expert_ids]
    for slot in range(len(expert_ids[0])):
        for token, row in enumerate(expert_ids):
            expert = row[slot]
            if used.get(expert, 0) < capacity:
                used[expert] = used.get(expert, 0) + 1
                keep[token][slot] = True
    return keep


@st.composite
def routing(draw: st.DrawFn) -> tuple[torch.Tensor, int, float]:
    num_experts = draw(st.integers(1, 9))
    top_k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 10_000))
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    # a skewed router now and then, so capacity really binds
    if draw(st.booleans()):
        logits[:, 0] += 3
    expert_ids = torch.topk(logits, top_k, dim=-1).indices
    factor = draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]))
    return expert_ids, num_experts, factor


@settings(max_examples=300, deadline=None)
@given(routing())
def test_capacity_rule_matches_reference_and_bounds_every_expert(case: tuple[torch.Tensor, int, float]) -> None:
    expert_ids, num_experts, factor = case
    num_tokens, top_k = expert_ids.shape
    capacity = compute_expert_capacity(num_tokens, top_k, num_experts, factor)
    assert capacity == max(1, math.ceil(factor * num_tokens * top_k / num_experts))

    kept = keep_within_capacity(expert_ids, num_experts, capacity)

    assert kept.tolist() == reference_keep(expert_ids.tolist(), capacity)
    rows = torch.bincount(expert_ids[kept], minlength=num_experts)
    assert int(rows.max()) <= capacity
    # an expert drops slots only when it is full
    for expert in range(num_experts):
        if bool(((expert_ids == expert) & ~kept).any()):
            assert int(rows[expert]) == capacity


def test_factor_zero_is_dropless() -> None:
    assert compute_expert_capacity(100, 2, 8, 0.0) == UNLIMITED
    expert_ids = torch.zeros(50, 2, dtype=torch.long)
    assert bool(keep_within_capacity(expert_ids, 4, UNLIMITED).all())


def test_first_choices_win_over_earlier_tokens_second_choices() -> None:
    # token 0 picks expert 1 second; token 1 picks expert 1 first; capacity 1 goes to token 1
    expert_ids = torch.tensor([[0, 1], [1, 0]])
    assert keep_within_capacity(expert_ids, 2, 1).tolist() == [[True, False], [True, False]]
