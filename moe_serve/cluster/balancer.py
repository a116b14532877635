"""Hot-expert replication: how many replicas each expert gets, and which worker holds which.

The formulation is DeepSeek's EPLB (expert-parallel load balancer), single level:
1. replicate: within a budget of `slots` replica slots (>= experts), repeatedly give one more
   replica to the expert with the highest load per replica;
2. pack: place replicas on workers, heaviest first, each on the least-loaded worker that has a
   free slot and does not hold that expert yet, so every worker ends with the same number of
   replicas and as even a load as the greedy allows.
The load of a replica is its expert's load divided by the expert's replica count (routers split
and spread an expert's rows over its replicas).

The live controller's policy is the node-aware placement planner with weighted replica shares,
applied with hysteresis (moe_serve.cluster.policies.rebalance); `imbalance` and `Rebalance` are shared.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moe_serve.cluster.placement import ExpertKey


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
