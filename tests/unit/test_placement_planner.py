"""The node-aware placement planner: invariants as properties, and the issue's target at DeepSeek-V3 size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moe_serve.cli.main import app
from moe_serve.cluster.placement import ExpertKey
from moe_serve.cluster.placement_figures import check_plan, gpu_loads
from moe_serve.cluster.placement_packing import pack_node
from moe_serve.cluster.placement_planner import (
    ClusterShape,
    group_of_experts,
    plan_layer,
    plan_layer_with_shared,
    plan_placement_layers,
)
from moe_serve.cluster.policies.rebalance import plan_node_aware_rebalance


@st.composite
def placement_cases(draw: st.DrawFn) -> tuple[np.ndarray, ClusterShape, int | None]:
    nodes = draw(st.integers(1, 4))
    gpus_per_node = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([None, nodes, 2 * nodes]))
    per_group = draw(st.integers(1, 6))
    experts = (groups or draw(st.integers(1, 24))) * per_group
    gpus = nodes * gpus_per_node
    # enough slots that every group fits a node once each, plus some for replicas
    minimum = max(-(-experts // gpus), -(-(experts // (groups or experts)) // gpus_per_node) if groups else 1)
    slots = draw(st.integers(minimum, minimum + 3))
    if groups and -(-groups // nodes) * (experts // groups) > gpus_per_node * slots:
        slots = -(-(-(-groups // nodes) * (experts // groups)) // gpus_per_node)
    kind = draw(st.sampled_from(["lognormal", "zeros", "one-hot", "integers"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layers = draw(st.integers(1, 3))
    if kind == "lognormal":
        loads = rng.lognormal(0, draw(st.floats(0.1, 2.5)), size=(layers, experts))
    elif kind == "zeros":
        loads = np.zeros((layers, experts))
    elif kind == "one-hot":
        loads = np.zeros((layers, experts))
        loads[:, rng.integers(experts)] = 1000.0
    else:
        loads = rng.integers(0, 50, size=(layers, experts)).astype(float)
    return loads, ClusterShape.uniform(nodes, gpus_per_node, slots), groups


@settings(max_examples=300, deadline=None)
@given(case=placement_cases())
def test_every_expert_placed_slots_respected_shares_sum_to_one(case: tuple) -> None:
    loads, shape, groups = case
    plan = plan_placement_layers(loads, shape, groups)
    check_plan(plan.layers, loads.shape[1], shape.slots_per_gpu)  # raises on any broken invariant
    for layer_loads, layer in zip(loads, plan.layers, strict=True):
        assert len(layer.experts) == len(shape.node_of_gpu)
        # replica counts: an expert's replicas are the GPUs listing it; every one takes a positive share
        replicas = np.bincount(
            np.concatenate([np.array(e, dtype=int) for e in layer.experts]), minlength=len(layer_loads)
        )
        assert replicas.min() >= 1 and replicas.max() <= len(shape.node_of_gpu)
        assert all(share > 0 for gpu in layer.shares for share in gpu)
        # the GPUs carry exactly the layer's load
        assert np.isclose(gpu_loads(layer_loads, layer).sum(), layer_loads.sum(), rtol=1e-9, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(case=placement_cases())
def test_deterministic_for_the_same_loads(case: tuple) -> None:
    loads, shape, groups = case
    first, second = plan_placement_layers(loads, shape, groups), plan_placement_layers(loads, shape, groups)
    assert [layer.experts for layer in first.layers] == [layer.experts for layer in second.layers]
    assert [layer.shares for layer in first.layers] == [layer.shares for layer in second.layers]


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40),
    gpus=st.integers(1, 8),
    spare=st.integers(0, 3),
)
def test_a_node_with_a_slot_per_boundary_balances_exactly(loads: list[float], gpus: int, spare: int) -> None:
    """Wrap-around needs (experts + GPUs - 1) slots for perfect balance; with them, it is perfect."""
    slots = -(-(len(loads) + gpus - 1) // gpus) + spare
    held = pack_node(dict(enumerate(loads)), gpus, slots)
    per_gpu = [sum(h.values()) for h in held]
    assert max(len(h) for h in held) <= slots
    assert max(per_gpu) <= sum(loads) / gpus * (1 + 1e-6)


def test_refuses_what_cannot_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        plan_layer(np.ones(10), ClusterShape.uniform(1, 2, 4), group_of_experts(10, None))
    with pytest.raises(ValueError, match="equal groups"):
        group_of_experts(10, 3)


def test_deepseek_v3_sized_target() -> None:
    """The issue's setting: 58 layers x 256 experts in 8 groups, lognormal(0, 1.2), 4 nodes x 8 GPUs x 9 slots:
    mean max/mean <= 1.02, worst layer <= 1.05, locality >= 97%, within 30 s."""
    loads = np.random.default_rng(0).lognormal(0.0, 1.2, size=(58, 256))
    plan = plan_placement_layers(loads, ClusterShape.uniform(4, 8, 9), num_groups=8)
    check_plan(plan.layers, 256, 9)
    figures = plan.figures
    assert figures["mean_max_over_mean"] <= 1.02
    assert figures["worst_layer_max_over_mean"] <= 1.05
    assert figures["locality"] >= 0.97
    assert figures["seconds"] <= 30


def test_a_shared_expert_goes_on_every_gpu_and_the_routed_groups_stay_on_their_nodes() -> None:
    """DeepSeek-V3's layout in small: 256 routed experts in 8 groups and one shared expert (id 256,
    a row of every token: 1/9 of the rows at top-8), 4 nodes x 2 GPUs."""
    rng = np.random.default_rng(3)
    routed = rng.lognormal(0.0, 1.0, size=256)
    loads = np.append(routed, routed.sum() / 8)
    shape = ClusterShape.uniform(4, 2, 34 + 1)
    layer = plan_layer_with_shared(loads, shape, group_of_experts(256, 8), num_shared=1)
    check_plan([layer], 257, shape.slots_per_gpu)
    assert all(
        gpu[-1] == 256 and np.isclose(shares[-1], 1 / 8)
        for gpu, shares in zip(layer.experts, layer.shares, strict=True)
    )
    per_gpu = gpu_loads(loads, layer)
    assert per_gpu.max() / per_gpu.mean() <= 1.02
    plan = plan_placement_layers(loads[None, :], shape, num_groups=8, num_shared=1)
    # the shared expert (1/9 of the load) is a group of its own spread over 4 nodes by design: 1/4 local
    assert plan.figures["locality"] >= 8 / 9 * 0.97 + 1 / 9 * 0.25
    with pytest.raises(ValueError, match="leave none"):
        plan_layer_with_shared(loads, ClusterShape.uniform(4, 2, 1), group_of_experts(256, 8), num_shared=1)


def test_node_aware_rebalance_keeps_groups_with_a_shared_expert() -> None:
    """The controller's call for a DeepSeek-V3 layer: groups used (not dropped for the shared expert)."""
    rng = np.random.default_rng(4)
    loads = {ExpertKey(1, e): float(x) for e, x in enumerate(rng.zipf(1.5, size=256).clip(max=200))}
    loads[ExpertKey(1, 256)] = sum(loads.values()) / 8
    current = [{ExpertKey(1, e) for e in block} for block in np.array_split(np.arange(257), 4)]
    plan = plan_node_aware_rebalance(loads, current, [0, 1, 2, 3], 66, 1, 257, num_groups=8, num_shared=1)
    assert all(ExpertKey(1, 256) in held for held in plan.placement)
    assert plan.new_imbalance <= 1.05 < plan.current_imbalance
    # each group's experts mostly on one node: whole groups, only spilled parts elsewhere
    for group in range(8):
        holders = [
            w
            for w, held in enumerate(plan.placement)
            for e in range(32 * group, 32 * group + 32)
            if ExpertKey(1, e) in held
        ]
        assert max(np.bincount(holders)) >= 28


def test_plan_command_writes_placement_shares_and_figures(tmp_path: Path) -> None:
    loads = np.random.default_rng(1).lognormal(0.0, 1.2, size=(3, 64))
    np.save(tmp_path / "loads.npy", loads)
    out = tmp_path / "plan.json"
    args = ["plan", "--loads", str(tmp_path / "loads.npy"), "--nodes", "2", "--gpus-per-node", "4"]
    result = CliRunner().invoke(app, [*args, "--slots-per-gpu", "9", "--groups", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert len(document["placement"]) == 3 and len(document["placement"][0]) == 8
    assert [len(g) for g in document["placement"][0]] == [len(g) for g in document["replica_shares"][0]]
    assert set(document["figures"]) >= {"mean_max_over_mean", "worst_layer_max_over_mean", "locality"}
    bad = CliRunner().invoke(app, [*args, "--slots-per-gpu", "4", "--json", str(out)])
    assert bad.exit_code == 2 and "do not fit" in bad.output
