"""The controller's control loop without Ray: desired state and a snapshot in, actions out."""

from __future__ import annotations

from moe_serve.cluster.placement import ExpertKey
from moe_serve.cluster.policies.autoscale import AutoscalePolicy, decide_worker_count
from moe_serve.cluster.policies.rebalance import decide_rebalance
from moe_serve.cluster.reconcile import (
    ExpertReplicas,
    Observed,
    Placement,
    PlacementShape,
    WorkerCount,
    WorkerView,
    compute_actions,
    initial_actions,
)
from moe_serve.worker_record import WorkerRecord

SHAPE = PlacementShape(moe_layers=(0, 1), num_placed_experts=4)


def keys(*experts: int, layers: tuple[int, ...] = (0, 1)) -> frozenset[ExpertKey]:
    return frozenset(ExpertKey(layer, e) for layer in layers for e in experts)


def two_workers(has_shares: bool = False) -> Observed:
    return Observed({"w0": WorkerView(keys(0, 1)), "w1": WorkerView(keys(2, 3))}, has_shares)


def test_initial_actions_place_every_expert_once() -> None:
    actions = initial_actions(SHAPE, 2)
    assert [experts for experts, _ in actions.add] == [keys(0, 1), keys(2, 3)]
    assert not actions.remove and not actions.load and not actions.unload and actions.shares is None


def test_a_worker_count_starts_a_fresh_set_then_removes_the_old_one_and_clears_shares() -> None:
    actions = compute_actions(WorkerCount(4), two_workers(has_shares=True), SHAPE)
    assert actions.clear_shares
    assert sorted(experts for experts, _ in actions.add) == sorted(keys(e) for e in range(4))
    assert actions.remove == ["w0", "w1"]


def test_more_replicas_of_an_expert_are_dedicated_workers() -> None:
    actions = compute_actions(ExpertReplicas(keys(2), 3), two_workers(), SHAPE)
    assert actions.add == [(keys(2), keys(2))] * 2
    assert not actions.clear_shares and not actions.remove and not actions.unload


def test_fewer_replicas_remove_dedicated_workers_first_then_unload() -> None:
    observed = Observed(
        {
            "w0": WorkerView(keys(0, 1)),
            "w1": WorkerView(keys(0, 2, 3)),
            "w2": WorkerView(keys(0), dedicated_to=keys(0)),
        }
    )
    actions = compute_actions(ExpertReplicas(keys(0), 1), observed, SHAPE)
    assert actions.remove == ["w2"]
    assert actions.unload == {"w0": set(keys(0))}


def test_a_placement_loads_what_is_missing_and_unloads_what_is_extra() -> None:
    target = {"w0": set(keys(0, 1, 2)), "w1": set(keys(2, 3))}
    shares = {ExpertKey(0, 2): {"w0": 0.5, "w1": 0.5}}
    actions = compute_actions(Placement(target, shares), two_workers(), SHAPE)
    assert actions.load == {"w0": set(keys(2))}
    assert actions.unload == {}
    assert actions.shares == shares and not actions.add and not actions.remove


def test_rebalance_keeps_the_placement_without_load_or_with_one_worker() -> None:
    experts = {"w0": set(keys(0, 1)), "w1": set(keys(2, 3))}
    assert decide_rebalance({}, experts, {}, {}, SHAPE).target is None
    loads = {key: 5 for key in keys(0, 1, 2, 3)}
    assert decide_rebalance(loads, {"w0": set(keys(0, 1, 2, 3))}, {}, {}, SHAPE).target is None


def test_rebalance_moves_a_hot_pair_apart_with_shares() -> None:
    experts = {"w0": set(keys(0, 1)), "w1": set(keys(2, 3))}
    loads = {key: 1 for key in keys(0, 1, 2, 3)} | {ExpertKey(0, 0): 100, ExpertKey(0, 1): 100}
    decision = decide_rebalance(loads, experts, {"w0": "a", "w1": "a"}, {}, SHAPE)
    assert decision.report["applied"] and decision.target is not None
    layer0 = [{k for k in held if k.layer == 0} for held in decision.target.experts.values()]
    assert all(ExpertKey(0, 0) in held or ExpertKey(0, 1) in held for held in layer0)
    assert decision.target.shares


def test_autoscale_decision_over_records() -> None:
    policy = AutoscalePolicy(target_queued_rows=10, window=1, minimum=1, maximum=3)
    busy = [WorkerRecord(worker_id=f"w{i}", address="a:1", experts=()) for i in range(2)]
    for record in busy:
        record.load["queued_rows"] = 50
    assert decide_worker_count(policy, []) is None
    decision = decide_worker_count(policy, busy)
    assert decision is not None and (decision.current, decision.wanted) == (2, 3)
