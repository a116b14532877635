"""Dispatch + combine, without any server, reproduce transformers' Mixtral block exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moe_serve.checkpoint import RouterWeights
from moe_serve.layer.capacity import keep_within_capacity
from moe_serve.layer.combine import COMBINE_CHUNK_TOKENS, FEW_ROWS, CombineBuffer
from moe_serve.layer.dispatch import FEW_SLOTS, _group_few, _group_many, group_by_expert, token_indices
from moe_serve.layer.gating import compute_gating
from moe_serve.model_spec import RoutingConfig
from moe_serve.runtime.errors import InvalidInput
from tests.families import rescale_moe_weights


def local_moe(block: MixtralSparseMoeBlock, hidden: torch.Tensor, capacity: int = 0) -> torch.Tensor:
    """The served algorithm in one process: gate, keep, group per expert, compute, combine."""
    experts = block.experts
    gating = compute_gating(
        hidden,
        RouterWeights(block.gate.weight.detach()),
        RoutingConfig("mixtral", block.top_k, mechanism="softmax_topk"),
    )
    kept = keep_within_capacity(gating.expert_ids, experts.num_experts, capacity)
    groups = group_by_expert(gating.expert_ids, kept, experts.num_experts)
    buffer = CombineBuffer(hidden.shape[0], block.top_k, hidden.shape[1], hidden.dtype)
    for expert in reversed(groups.active_experts()):  # arrival order must not matter
        positions = groups.segment(expert)
        rows = hidden[token_indices(positions, block.top_k)]
        gate, up = F.linear(rows, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        buffer.add(positions, F.linear(F.silu(gate) * up, experts.down_proj[expert]).detach())
    weights = torch.where(kept, gating.expert_weights, torch.zeros(()))
    return buffer.combine(weights)


def make_block(seed: int = 0) -> MixtralSparseMoeBlock:
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=40, num_local_experts=5, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config)
    rescale_moe_weights(block, seed)
    return block.eval()


def test_local_pipeline_equals_transformers_block() -> None:
    block = make_block()
    hidden = torch.randn(37, 32)
    with torch.no_grad():
        expected = block(hidden.unsqueeze(0))[0]
        torch.testing.assert_close(local_moe(block, hidden), expected, rtol=1e-6, atol=1e-6)


def test_dropped_slots_contribute_zero() -> None:
    block = make_block(1)
    hidden = torch.randn(20, 32)
    with torch.no_grad():
        dropless = local_moe(block, hidden)
        capped = local_moe(block, hidden, capacity=2)
        gating = compute_gating(
            hidden, RouterWeights(block.gate.weight), RoutingConfig("mixtral", 2, mechanism="softmax_topk")
        )
        kept = keep_within_capacity(gating.expert_ids, 5, 2)
    fully_dropped = ~kept.any(-1)
    assert bool(fully_dropped.any())
    assert bool((capped[fully_dropped] == 0).all())
    fully_kept = kept.all(-1)
    torch.testing.assert_close(capped[fully_kept], dropless[fully_kept])


def test_duplicate_delivery_is_ignored() -> None:
    buffer = CombineBuffer(2, 2, 3, torch.float32)
    assert buffer.add(torch.tensor([0, 3]), torch.ones(2, 3)) == 2
    assert buffer.add(torch.tensor([3, 1]), torch.full((2, 3), 5.0)) == 1
    assert buffer.rows_filled == 3
    out = buffer.combine(torch.ones(2, 2))
    assert out.tolist() == [[6.0] * 3, [1.0] * 3]


def test_grouping_orders_rows_by_expert() -> None:
    expert_ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    groups = group_by_expert(expert_ids, torch.ones_like(expert_ids, dtype=torch.bool), 4)
    assert groups.counts.tolist() == [2, 2, 2, 0]
    assert groups.segment(0).tolist() == [1, 2] and groups.segment(2).tolist() == [0, 4]
    assert groups.active_experts() == [0, 1, 2]


@pytest.mark.parametrize("num_rows", [1, 3, FEW_ROWS + 4], ids=["one row", "few rows", "many rows"])
def test_bad_deliveries_are_refused_whether_placed_row_by_row_or_at_once(num_rows: int) -> None:
    """The few-rows path (Python checks) and the vectorised one refuse and accept exactly the same."""
    buffer = CombineBuffer(num_tokens=num_rows, slots_per_token=2, hidden_size=4, dtype=torch.float32)
    rows = torch.randn(num_rows, 4)
    with pytest.raises(InvalidInput, match="outside"):
        buffer.add(torch.tensor([2 * num_rows] + [0] * (num_rows - 1)), rows)
    with pytest.raises(InvalidInput, match="outside"):
        buffer.add(torch.full((num_rows,), -1), rows)
    if num_rows > 1:
        with pytest.raises(InvalidInput, match="twice"):
            buffer.add(torch.zeros(num_rows, dtype=torch.int32), rows)
    assert buffer.rows_filled == 0
    even = torch.arange(0, 2 * num_rows, 2, dtype=torch.int32)
    assert buffer.add(even, rows) == num_rows
    assert buffer.add(even, rows + 1) == 0  # a hedge's or retry's duplicate: the first rows stay
    assert torch.equal(buffer.contributions[0::2], rows)
    # the odd slots were never delivered: they combine as 0 (as a dropped slot does)
    assert torch.equal(buffer.combine(torch.tensor([[1.0, 1.0]]).expand(num_rows, 2)), rows)
    assert buffer.add(even + 1, -rows) == num_rows and buffer.rows_filled == 2 * num_rows
    assert torch.equal(buffer.contributions[1::2], -rows)


@pytest.mark.parametrize("num_tokens", [1, 2, 5, 32])
def test_small_batches_group_exactly_as_the_tensor_path(num_tokens: int) -> None:
    """A decode step's few slots are grouped on Python lists: same positions, counts and offsets."""
    generator = torch.Generator().manual_seed(num_tokens)
    for _ in range(50):
        expert_ids = torch.randint(0, 6, (num_tokens, 2), generator=generator)
        kept = torch.rand(num_tokens, 2, generator=generator) > 0.3
        assert expert_ids.numel() <= FEW_SLOTS
        few = _group_few(expert_ids.reshape(-1).tolist(), kept.reshape(-1).tolist(), 6)
        many = _group_many(expert_ids, kept, 6)
        for name in ("positions", "counts", "offsets"):
            assert torch.equal(getattr(few, name), getattr(many, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("top_k", "shared"), [(2, 0), (8, 0), (4, 1)])
def test_combine_in_token_chunks_gives_the_bits_of_one_expression(dtype: torch.dtype, top_k: int, shared: int) -> None:
    """Combining a long request chunk by chunk changes nothing: each token's sum is the same."""
    num_tokens, hidden = 3 * COMBINE_CHUNK_TOKENS + 5, 16
    slots = top_k + shared
    buffer = CombineBuffer(num_tokens, slots, hidden, dtype)
    rows = torch.randn(num_tokens * slots, hidden).to(dtype)
    buffer.add(torch.randperm(num_tokens * slots), rows)
    buffer.contributions.copy_(rows)  # slot order as generated, so the expression below can use them
    weights, gates = torch.rand(num_tokens, top_k), torch.rand(num_tokens, shared) if shared else None
    view = rows.view(num_tokens, slots, hidden)
    expected = (view[:, :top_k] * weights.unsqueeze(-1)).sum(dim=1).to(dtype)
    if shared:
        expected = expected + (view[:, top_k:] * gates.to(dtype).unsqueeze(-1)).sum(dim=1)
    assert torch.equal(buffer.combine(weights, gates), expected)
