"""Placement plan properties: every (layer, expert) placed, balanced, replicas beyond E workers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.cluster.placement import ExpertKey, expert_blocks, parse_expert_ids, plan_placement


@settings(max_examples=200, deadline=None)
@given(num_experts=st.integers(1, 64), num_workers=st.integers(1, 80), num_layers=st.integers(1, 4))
def test_every_expert_is_placed_and_load_is_balanced(num_experts: int, num_workers: int, num_layers: int) -> None:
    layers = list(range(0, 2 * num_layers, 2))
    plan = plan_placement(layers, num_experts, num_workers)

    assert len(plan) == num_workers
    placed = [key for assignment in plan for key in assignment.experts]
    assert set(placed) == {ExpertKey(layer, e) for layer in layers for e in range(num_experts)}
    sizes = [len(a.expert_ids()) for a in plan]
    assert max(sizes) - min(sizes) <= 1
    replicas = [sum(1 for a in plan if e in a.expert_ids()) for e in range(num_experts)]
    assert max(replicas) - min(replicas) <= 1
    if num_workers <= num_experts:
        assert all(r == 1 for r in replicas)
        for block in expert_blocks(num_experts, num_workers):
            assert block == list(range(block[0], block[-1] + 1))


def test_eight_experts_on_four_workers_two_each() -> None:
    assert expert_blocks(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_parse_expert_ids() -> None:
    assert parse_expert_ids("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_expert_ids(" 5 ") == [5]
    for bad in ("", "3-1", "a", "1,-2"):
        with pytest.raises(ValueError):
            parse_expert_ids(bad)
