"""Capacity rules: properties checked against plain-loop statements of the GShard/Switch priority rule."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.layer.capacity import (
    UNLIMITED,
    apply_capacity,
    combine_weights,
    compute_expert_capacity,
    keep_within_capacity,
)
from tests.capacity_reference import reference_capacity


@st.composite
def routing(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float]:
    num_experts = draw(st.integers(1, 9))
    top_k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 10_000))
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):  # a skewed router now and then, so capacity really binds
        logits[:, 0] += 3
    scores = torch.softmax(logits, dim=-1)
    factor = draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]))
    return torch.topk(scores, top_k, dim=-1).indices, scores, factor


@settings(max_examples=300, deadline=None)
@given(routing(), st.sampled_from(["drop", "reroute"]))
def test_capacity_rule_matches_reference_and_bounds_every_expert(case, rule: str) -> None:
    expert_ids, scores, factor = case
    num_tokens, top_k = expert_ids.shape
    num_experts = scores.shape[1]
    capacity = compute_expert_capacity(num_tokens, top_k, num_experts, factor)
    assert capacity == max(1, math.ceil(factor * num_tokens * top_k / num_experts))

    outcome = apply_capacity(expert_ids, scores, capacity, rule)

    final, status = reference_capacity(expert_ids.tolist(), scores.tolist(), capacity, rule)
    assert outcome.expert_ids.tolist() == final
    assert outcome.kept.tolist() == [[s != "dropped" for s in row] for row in status]
    assert outcome.rerouted.tolist() == [[s == "rerouted" for s in row] for row in status]
    # no expert over capacity, rerouting included; no slot both kept and dropped
    rows = torch.bincount(outcome.expert_ids[outcome.kept], minlength=num_experts)
    assert int(rows.max()) <= capacity
    assert not bool((outcome.kept & outcome.dropped).any()) and bool((outcome.kept | outcome.dropped).all())
    assert not bool((outcome.rerouted & ~outcome.kept).any())
    # a token never uses one expert twice
    for token in range(num_tokens):
        used = outcome.expert_ids[token][outcome.kept[token]].tolist()
        assert len(used) == len(set(used))
    if rule == "drop":
        # an expert drops slots only when it is full
        for expert in range(num_experts):
            if bool(((expert_ids == expert) & ~outcome.kept).any()):
                assert int(rows[expert]) == capacity


@settings(max_examples=100, deadline=None)
@given(routing())
def test_reroute_weights_keep_each_tokens_total(case) -> None:
    expert_ids, scores, factor = case
    num_tokens, top_k = expert_ids.shape
    capacity = compute_expert_capacity(num_tokens, top_k, scores.shape[1], factor)
    weights = scores.gather(1, expert_ids)
    weights = weights / weights.sum(-1, keepdim=True)  # renormalised top-k, as Mixtral's
    outcome = apply_capacity(expert_ids, scores, capacity, "reroute")
    final = combine_weights(outcome, weights, scores, "reroute")
    assert bool((final[~outcome.kept] == 0).all())
    any_kept = outcome.kept.any(dim=-1)
    torch.testing.assert_close(final.sum(-1)[any_kept], weights.sum(-1)[any_kept])
    # within a token, kept weights stay proportional to their raw values: the original weight for
    # a slot kept where gating put it, the new expert's score for a rerouted slot
    raw = torch.where(outcome.rerouted, scores.gather(1, outcome.expert_ids), weights)
    raw = torch.where(outcome.kept, raw, torch.zeros(()))
    expected = raw * (weights.sum(-1, keepdim=True) / raw.sum(-1, keepdim=True).clamp_min(1e-30))
    torch.testing.assert_close(final[any_kept], expected[any_kept])


def test_factor_zero_is_dropless() -> None:
    assert compute_expert_capacity(100, 2, 8, 0.0) == UNLIMITED
    expert_ids = torch.zeros(50, 2, dtype=torch.long)
    assert bool(keep_within_capacity(expert_ids, 4, UNLIMITED).all())


def test_first_choices_win_over_earlier_tokens_second_choices() -> None:
    # token 0 picks expert 1 second; token 1 picks expert 1 first; capacity 1 goes to token 1
    expert_ids = torch.tensor([[0, 1], [1, 0]])
    assert keep_within_capacity(expert_ids, 2, 1).tolist() == [[True, False], [True, False]]


def test_reroute_goes_to_next_best_expert_with_room() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    expert_ids = torch.tensor([[0], [0]])
    outcome = apply_capacity(expert_ids, scores, 1, "reroute")
    # token 0 keeps expert 0; token 1 overflows to its next best, expert 2
    assert outcome.expert_ids.tolist() == [[0], [2]] and outcome.rerouted.tolist() == [[False], [True]]
