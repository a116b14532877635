"""Rebalancing: the node-aware placement of each MoE layer over the load measured since the last
step, applied only when it lowers the max/mean worker load by a margin (hysteresis), so measurement
noise does not make the placement flap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_serve.cluster.balancer import Rebalance, imbalance
from moe_serve.cluster.placement import ExpertKey
from moe_serve.cluster.reconcile import Placement, PlacementShape, Shares


def plan_node_aware_rebalance(
    loads: Mapping[ExpertKey, float],
    current: Sequence[set[ExpertKey]],
    node_of_worker: Sequence[int],
    slots_per_worker: int,
    layer: int,
    num_experts: int,
    num_groups: int | None = None,
    num_shared: int = 0,
) -> Rebalance:
    """The placement planner's plan (moe_serve.cluster.placement_planner) for one layer on the current workers,
    each worker one "GPU" on its Ray node (node_of_worker: 0..N-1), with its replica shares.
    num_experts counts the placed experts: routed ones in `num_groups` groups, then `num_shared`
    shared ones, which every worker then holds (plan_layer_with_shared)."""
    import numpy as np

    from moe_serve.cluster.placement_figures import gpu_loads
    from moe_serve.cluster.placement_planner import ClusterShape, group_of_experts, plan_layer_with_shared

    layer_loads = np.array([float(loads.get(ExpertKey(layer, e), 0.0)) for e in range(num_experts)])
    shape = ClusterShape(tuple(node_of_worker), slots_per_worker)
    groups = group_of_experts(num_experts - num_shared, num_groups)
    plan = plan_layer_with_shared(layer_loads, shape, groups, num_shared)
    per_worker = gpu_loads(layer_loads, plan)
    mean = float(per_worker.mean())
    return Rebalance(
        placement=[{ExpertKey(layer, e) for e in experts} for experts in plan.experts],
        current_imbalance=imbalance(loads, current),
        new_imbalance=float(per_worker.max()) / mean if mean > 0 else 1.0,
        shares=[
            {ExpertKey(layer, e): share for e, share in zip(experts, shares, strict=True)}
            for experts, shares in zip(plan.experts, plan.shares, strict=True)
        ],
    )


def should_apply(plan: Rebalance, min_gain: float = 0.15) -> bool:
    """Hysteresis: apply only when imbalance drops by at least `min_gain` (relative)."""
    return plan.new_imbalance < plan.current_imbalance * (1 - min_gain)


@dataclass
class RebalanceDecision:
    # per layer: {"imbalance": now, "planned": with the plan}; "nodes": Ray nodes of the workers;
    # "applied": whether any layer's plan passed the hysteresis
    report: dict[str, Any] = field(default_factory=lambda: {"applied": False, "layers": {}})
    target: Placement | None = None  # None: keep the placement


def decide_rebalance(
    loads: Mapping[ExpertKey, int],
    experts: Mapping[str, set[ExpertKey]],
    node_of: Mapping[str, str],
    shares: Shares,
    shape: PlacementShape,
    slots_per_worker: int | None = None,
    min_gain: float = 0.15,
    num_groups: int | None = None,
) -> RebalanceDecision:
    """One rebalancing step over `loads` (rows per expert since the previous step), the experts each
    worker holds now, each worker's Ray node (`node_of`, by worker id) and the router's replica shares.
    Nodes are the workers' Ray node ids, each worker one GPU. Layers whose plan passes `should_apply`
    take its placement and shares; the others keep theirs."""
    worker_ids = sorted(experts)
    decision = RebalanceDecision()
    report = decision.report
    if not loads or sum(loads.values()) == 0 or len(worker_ids) < 2:
        return decision
    nodes = sorted({node_of.get(w, "") for w in worker_ids})
    node_of_worker = [nodes.index(node_of.get(w, "")) for w in worker_ids]
    report["nodes"] = len(nodes)
    target = {w: set(experts[w]) for w in worker_ids}
    shares = dict(shares)
    # the routed experts spread over the workers, 1/8 more slots for replicas of hot experts
    # (DeepSeek-V3 serves its 256 experts in 288 slots), plus the shared ones on each worker
    routed = shape.num_placed_experts - shape.num_shared
    per_worker = -(-routed // len(worker_ids))
    slots = slots_per_worker or per_worker + max(1, per_worker // 8) + shape.num_shared
    for layer in shape.moe_layers:
        current = [{k for k in experts[w] if k.layer == layer} for w in worker_ids]
        plan = plan_node_aware_rebalance(
            loads,
            current,
            node_of_worker,
            slots,
            layer,
            shape.num_placed_experts,
            num_groups or shape.expert_groups,
            shape.num_shared,
        )
        report["layers"][layer] = {"imbalance": plan.current_imbalance, "planned": plan.new_imbalance}
        if should_apply(plan, min_gain):
            for worker_id, keys in zip(worker_ids, plan.placement, strict=True):
                target[worker_id] = {k for k in target[worker_id] if k.layer != layer} | keys
            shares = {key: value for key, value in shares.items() if key.layer != layer}
            for worker_id, held in zip(worker_ids, plan.shares or [], strict=True):
                for key, share in held.items():
                    shares.setdefault(key, {})[worker_id] = share
            report["applied"] = True
    if report["applied"]:
        decision.target = Placement(target, shares)
    return decision
