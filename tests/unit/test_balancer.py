"""EPLB-style replication and packing, and the autoscaling policy (pure functions, no services)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.cluster.balancer import imbalance, pack, plan_rebalance, replicate
from moe_serve.cluster.placement import ExpertKey
from moe_serve.cluster.policies.autoscale import AutoscalePolicy
from moe_serve.cluster.policies.rebalance import should_apply


@st.composite
def loads_and_budget(draw: st.DrawFn):
    experts = draw(st.integers(2, 16))
    workers = draw(st.integers(1, 8))
    per_worker = draw(st.integers(-(-experts // workers), -(-experts // workers) + 3))
    loads = {ExpertKey(0, e): draw(st.floats(0, 1000)) for e in range(experts)}
    return loads, workers, per_worker


@settings(max_examples=200, deadline=None)
@given(loads_and_budget())
def test_every_expert_placed_once_per_worker_within_the_budget(case) -> None:
    loads, workers, per_worker = case
    counts = replicate(loads, per_worker * workers, max_replicas=workers)
    assert set(counts) == set(loads) and all(1 <= c <= workers for c in counts.values())
    assert sum(counts.values()) <= per_worker * workers
    placement = pack(loads, counts, workers)
    assert len(placement) == workers
    held = [key for worker in placement for key in worker]
    assert sorted(held) == sorted(key for key, c in counts.items() for _ in range(c))  # each replica once
    sizes = [len(worker) for worker in placement]
    assert max(sizes) - min(sizes) <= 1 or max(sizes) <= -(-sum(counts.values()) // workers)


def test_the_hot_expert_gets_the_extra_replicas() -> None:
    loads = {ExpertKey(0, e): 1.0 for e in range(8)}
    loads[ExpertKey(0, 3)] = 10.0
    counts = replicate(loads, 12, max_replicas=4)
    assert counts[ExpertKey(0, 3)] == 4 and sum(counts.values()) == 12


def test_rebalancing_a_skewed_load_lowers_imbalance_and_passes_hysteresis() -> None:
    loads = {ExpertKey(0, e): 1.0 for e in range(8)}
    loads[ExpertKey(0, 0)] = 12.0  # one expert takes 63% of the rows
    current = [{ExpertKey(0, e) for e in range(4)}, {ExpertKey(0, e) for e in range(4, 8)}]
    plan = plan_rebalance(loads, current, slots_per_worker=5)
    assert plan.current_imbalance == imbalance(loads, current) > 1.4
    assert plan.new_imbalance < 1.1
    assert should_apply(plan)
    # balanced load: the plan brings nothing worth a move
    even = {key: 1.0 for key in loads}
    assert not should_apply(plan_rebalance(even, current, slots_per_worker=5))


def test_autoscale_policy_needs_a_full_window_and_respects_bounds() -> None:
    policy = AutoscalePolicy(target_queued_rows=100, window=3, minimum=2, maximum=3)
    assert [policy.decide(2, 500, 1000) for _ in range(3)] == [2, 2, 3]
    assert policy.decide(3, 500, 1000) == 3  # at the maximum
    assert [policy.decide(3, 0, 0) for _ in range(3)] == [3, 3, 2]
    assert [policy.decide(2, 0, 0) for _ in range(3)] == [2, 2, 2]  # at the minimum
    assert [policy.decide(2, 500, 9), policy.decide(2, 0, 9), policy.decide(2, 500, 9)] == [2, 2, 2]  # not sustained


def test_node_aware_rebalance_balances_workers_keeps_groups_on_nodes_and_gives_shares() -> None:
    from moe_serve.cluster.policies.rebalance import plan_node_aware_rebalance

    # 16 experts in 2 groups; 4 workers on 2 Ray nodes; expert 3 is hot
    loads = {ExpertKey(1, e): 10.0 for e in range(16)}
    loads[ExpertKey(1, 3)] = 200.0
    current = [{ExpertKey(1, e) for e in range(w * 4, w * 4 + 4)} for w in range(4)]
    plan = plan_node_aware_rebalance(loads, current, [0, 0, 1, 1], slots_per_worker=6, layer=1, num_experts=16)
    assert plan.new_imbalance < plan.current_imbalance and plan.new_imbalance < 1.3
    assert set().union(*plan.placement) == set(loads)
    assert all(len(held) <= 6 for held in plan.placement)
    assert plan.shares is not None
    totals: dict[ExpertKey, float] = {}
    for held in plan.shares:
        for key, share in held.items():
            totals[key] = totals.get(key, 0.0) + share
    assert all(abs(total - 1.0) < 1e-9 for total in totals.values())
    grouped = plan_node_aware_rebalance(loads, current, [0, 0, 1, 1], 6, layer=1, num_experts=16, num_groups=2)
    node_of_expert = {key: {w // 2 for w, held in enumerate(grouped.placement) if key in held} for key in loads}
    # the cold group sits whole on one node
    cold = {frozenset(node_of_expert[ExpertKey(1, e)]) for e in range(8, 16)} | {
        frozenset(node_of_expert[ExpertKey(1, e)]) for e in range(8) if e != 3
    }
    assert all(len(nodes) == 1 for nodes in cold)
