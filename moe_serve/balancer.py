"""Hot-expert replication: how many replicas each expert gets, and which worker holds which.

The formulation is DeepSeek's EPLB (expert-parallel load balancer), single level:
1. replicate: within a budget of `slots` replica slots (>= experts), repeatedly give one more
   replica to the expert with the highest load per replica;
2. pack: place replicas on workers, heaviest first, each on the least-loaded worker that has a
   free slot and does not hold that expert yet, so every worker ends with the same number of
   replicas and as even a load as the greedy allows.
The load of a replica is its expert's load divided by the expert's replica count (routers split
and spread an expert's rows over its replicas).

`plan_node_aware_rebalance` is the live controller's policy: the node-aware placement planner
(moe_serve.placement_planner) with weighted replica shares, which the router then follows.

Applied live with hysteresis (`should_apply`): a new placement replaces the current one only if it
lowers the max/mean worker-load ratio by a margin, so measurement noise does not make it flap.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moe_serve.placement import ExpertKey


def replicate(loads: Mapping[ExpertKey, float], slots: int, max_replicas: int) -> dict[ExpertKey, int]:
    """Replica count per expert: one each, then extra ones to the heaviest load-per-replica, up to
    `slots` in all and `max_replicas` per expert (a worker holds at most one replica of an expert)."""
    if slots < len(loads):
        raise ValueError(f"{slots} replica slots cannot hold {len(loads)} experts once each")
    counts = dict.fromkeys(loads, 1)
    # max-heap of load per replica (negated); ties broken by key for determinism
    heap = [(-load, key) for key, load in loads.items() if max_replicas > 1]
    heapq.heapify(heap)
    for _ in range(slots - len(loads)):
        if not heap:
            break
        _, key = heapq.heappop(heap)
        counts[key] += 1
        if counts[key] < max_replicas:
            heapq.heappush(heap, (-loads[key] / counts[key], key))
    return counts


def pack(loads: Mapping[ExpertKey, float], counts: Mapping[ExpertKey, int], workers: int) -> list[set[ExpertKey]]:
    """Place every replica on one of `workers` workers with equal slot counts (up to rounding)."""
    replicas = sorted(
        ((loads[key] / counts[key], key) for key in counts for _ in range(counts[key])),
        key=lambda item: (-item[0], item[1]),
    )
    capacity = -(-len(replicas) // workers)  # ceil: workers hold at most this many replicas
    held: list[set[ExpertKey]] = [set() for _ in range(workers)]
    worker_load = [0.0] * workers
    for load, key in replicas:
        candidates = [w for w in range(workers) if len(held[w]) < capacity and key not in held[w]]
        if not candidates:
            raise ValueError(f"cannot place {counts[key]} replicas of {key} on {workers} workers")
        target = min(candidates, key=lambda w: (worker_load[w], len(held[w]), w))
        held[target].add(key)
        worker_load[target] += load
    return held


def worker_loads(loads: Mapping[ExpertKey, float], placement: Sequence[set[ExpertKey]]) -> list[float]:
    """Each worker's load when every expert's load is spread evenly over the workers holding it."""
    replicas: dict[ExpertKey, int] = {}
    for held in placement:
        for key in held:
            replicas[key] = replicas.get(key, 0) + 1
    return [sum(loads.get(key, 0.0) / replicas[key] for key in held) for held in placement]


def imbalance(loads: Mapping[ExpertKey, float], placement: Sequence[set[ExpertKey]]) -> float:
    """max / mean worker load (1.0 is perfectly even)."""
    per_worker = worker_loads(loads, placement)
    mean = sum(per_worker) / len(per_worker)
    return max(per_worker) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class Rebalance:
    placement: list[set[ExpertKey]]
    current_imbalance: float
    new_imbalance: float
    # per worker, the share of each held expert's rows it takes (node-aware plans); None: equal split
    shares: list[dict[ExpertKey, float]] | None = None


def plan_rebalance(
    loads: Mapping[ExpertKey, float], current: Sequence[set[ExpertKey]], slots_per_worker: int
) -> Rebalance:
    """The EPLB placement for the measured `loads` on as many workers as `current` has."""
    workers = len(current)
    counts = replicate(loads, slots_per_worker * workers, max_replicas=workers)
    placement = pack(loads, counts, workers)
    return Rebalance(placement, imbalance(loads, current), imbalance(loads, placement))


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
    """The placement planner's plan (moe_serve.placement_planner) for one layer on the current workers,
    each worker one "GPU" on its Ray node (node_of_worker: 0..N-1), with its replica shares.
    num_experts counts the placed experts: routed ones in `num_groups` groups, then `num_shared`
    shared ones, which every worker then holds (plan_layer_with_shared)."""
    import numpy as np

    from moe_serve.placement_figures import gpu_loads
    from moe_serve.placement_planner import ClusterShape, group_of_experts, plan_layer_with_shared

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
class AutoscalePolicy:
    """Asks for one more worker when queued rows per replica stay above `target_queued_rows` for
    `window` consecutive checks, and one fewer after `window` idle checks, within [minimum, maximum]."""

    target_queued_rows: float
    window: int
    minimum: int
    maximum: int
    _busy: int = 0
    _idle: int = 0

    def decide(self, workers: int, queued_rows_per_replica: float, rows_per_s: float) -> int:
        """The worker count to have now (the current one when nothing should change)."""
        busy = queued_rows_per_replica > self.target_queued_rows
        idle = queued_rows_per_replica == 0 and rows_per_s == 0
        self._busy = self._busy + 1 if busy else 0
        self._idle = self._idle + 1 if idle else 0
        if self._busy >= self.window and workers < self.maximum:
            self._busy = 0
            return workers + 1
        if self._idle >= self.window and workers > self.minimum:
            self._idle = 0
            return workers - 1
        return workers
