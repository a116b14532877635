"""Node-aware expert placement: which GPU holds which experts of a layer, and which share of each
expert's rows each of its replicas takes.

Setting: one MoE layer has E logical experts in NG groups of E/NG consecutive ids (a token's top-k
experts are drawn from few groups, so a group kept on one node keeps most of a token's rows inside
that node's fast interconnect). GPUs sit on nodes; every GPU has S expert slots.

The plan for one layer, in three steps:
1. home nodes: each group gets a home node, groups spread evenly by count; the assignment is
   improved by swapping groups between nodes to minimise the load that must leave its home node;
2. spill: a node whose home load exceeds (1 + node_slack) x its fair share sends the excess to the
   nodes below their fair share, as a part of one expert where one is big enough (one extra slot)
   or whole experts (no extra slot); only this spilled load is served off its group's node;
3. within each node, `pack_node` (placement_packing) places the node's expert pieces on its GPUs with
   the slot limit and chooses the replicas' shares so the GPUs carry equal load.

Replica shares are weighted: a replica takes the part of its expert's load the plan gave it, and
the router splits an expert's rows across replicas in exactly these proportions
(router_service.planner.split_rows_by_shares). Without shares the router splits equally.

Shared experts (DeepSeek's n_shared_experts, placed as ids E..E+S-1 after the routed ones) take a
row of every token, so they belong to no group: `plan_layer_with_shared` plans the routed experts
with their groups and gives every GPU a replica of each shared expert with an equal share, so the
shared rows add the same load to every GPU and never unbalance the plan (the layout serving
systems use: each GPU runs the shared expert for its part of the batch).

Locality (our definition): for each group of a layer, the share of its load served on the node
that serves the most of it; averaged over groups and layers, weighted by the group's load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from moe_serve.cluster.placement_packing import pack_node

# a node may carry this much above its fair share before it spills load to other nodes: the price
# in balance (max/mean <= 1 + slack when nodes balance their GPUs exactly) of keeping groups local
DEFAULT_NODE_SLACK = 0.01


@dataclass(frozen=True)
class ClusterShape:
    """The GPUs: `node_of_gpu[g]` is GPU g's node index (0..N-1), every GPU has `slots_per_gpu` slots."""

    node_of_gpu: tuple[int, ...]
    slots_per_gpu: int

    def __post_init__(self) -> None:
        if not self.node_of_gpu or self.slots_per_gpu < 1:
            raise ValueError("need at least one GPU and one slot per GPU")
        if sorted(set(self.node_of_gpu)) != list(range(max(self.node_of_gpu) + 1)):
            raise ValueError(f"node indices must be 0..N-1 with every node used, got {sorted(set(self.node_of_gpu))}")

    @classmethod
    def uniform(cls, nodes: int, gpus_per_node: int, slots_per_gpu: int) -> ClusterShape:
        """GPU g on node g // gpus_per_node."""
        return cls(tuple(g // gpus_per_node for g in range(nodes * gpus_per_node)), slots_per_gpu)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_gpu) + 1

    def gpus_of(self, node: int) -> list[int]:
        return [g for g, n in enumerate(self.node_of_gpu) if n == node]


@dataclass
class LayerPlan:
    """For each GPU, its slots' expert ids and the share of that expert's load each slot takes."""

    experts: list[list[int]]
    shares: list[list[float]]


@dataclass
class PlacementPlan:
    layers: list[LayerPlan]
    figures: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "placement": [layer.experts for layer in self.layers],
            "replica_shares": [[[round(s, 9) for s in gpu] for gpu in layer.shares] for layer in self.layers],
            "figures": self.figures,
        }


def group_of_experts(num_experts: int, num_groups: int | None) -> np.ndarray:
    """Group index per expert: NG groups of consecutive ids; None means every expert its own group."""
    if num_groups is None:
        return np.arange(num_experts)
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"{num_experts} experts do not split into {num_groups} equal groups")
    return np.arange(num_experts) // (num_experts // num_groups)


def assign_home_nodes(
    group_loads: np.ndarray, node_share: np.ndarray, max_groups: np.ndarray, slack: float
) -> np.ndarray:
    """Home node per group: heaviest group first onto the node with most room left (count-limited),
    then pairwise swaps between nodes while they lower the load above (1 + slack) x fair share."""
    total = float(group_loads.sum())
    target = node_share * total * (1 + slack)
    home = np.full(len(group_loads), -1)
    node_load = np.zeros(len(node_share))
    count = np.zeros(len(node_share), dtype=int)
    for group in np.argsort(-group_loads, kind="stable"):
        open_nodes = np.flatnonzero(count < max_groups)
        node = open_nodes[np.argmin(node_load[open_nodes] / node_share[open_nodes])]
        home[group], node_load[node], count[node] = node, node_load[node] + group_loads[group], count[node] + 1

    def spill(loads: np.ndarray) -> float:
        return float(np.maximum(loads - target, 0).sum())

    if len(group_loads) > 64:  # swaps are quadratic; with many small groups the greedy is close enough
        return home
    improved = True
    while improved:
        improved = False
        best = (spill(node_load), float((node_load / node_share).max()))
        for a in range(len(group_loads)):
            for b in range(a + 1, len(group_loads)):
                na, nb = home[a], home[b]
                if na == nb:
                    continue
                delta = group_loads[b] - group_loads[a]
                trial = node_load.copy()
                trial[na] += delta
                trial[nb] -= delta
                score = (spill(trial), float((trial / node_share).max()))
                if score < (best[0] - 1e-12 * total, best[1] - 1e-12):
                    home[a], home[b], node_load, best, improved = nb, na, trial, score, True
    return home


def spill_between_nodes(
    loads: np.ndarray, home_of_expert: np.ndarray, node_share: np.ndarray, node_slots: np.ndarray, slack: float
) -> list[dict[int, float]]:
    """Load of each expert served per node: home experts on their home node, less what overloaded
    nodes send to the nodes under their fair share (while those have a free slot for it)."""
    total = float(loads.sum())
    num_nodes = len(node_share)
    pieces = [{int(e): float(loads[e]) for e in np.flatnonzero(home_of_expert == n)} for n in range(num_nodes)]
    node_load = np.array([sum(p.values()) for p in pieces])
    excess = np.maximum(node_load - node_share * total * (1 + slack), 0)
    room = np.maximum(node_share * total - node_load, 0)
    for giver in np.argsort(-excess, kind="stable"):
        while excess[giver] > 1e-12 * total:
            open_nodes = [n for n in range(num_nodes) if len(pieces[n]) < node_slots[n] and room[n] > 1e-12 * total]
            if not open_nodes:
                break
            receiver = max(open_nodes, key=lambda n: (room[n], -n))
            amount = min(excess[giver], room[receiver])
            moved = _take_load(pieces[giver], pieces[receiver], amount, int(node_slots[receiver]))
            if moved <= 0:
                room[receiver] = 0.0  # it cannot take any of this giver's load
                continue
            excess[giver] -= moved
            room[receiver] -= moved
    return pieces


def _take_load(source: dict[int, float], dest: dict[int, float], amount: float, dest_slots: int) -> float:
    """Move `amount` of load from `source` to `dest` (which holds at most `dest_slots` experts): part
    of the smallest expert that covers it (one extra slot), else the largest experts whole (a slot
    moves with each). Returns the amount moved."""
    moved = 0.0
    while amount - moved > 1e-15 and len(source) > 1 and len(dest) < dest_slots:
        need = amount - moved
        covering = [e for e, load in source.items() if load > need]
        if covering:
            expert = min(covering, key=lambda e: (source[e], e))
            source[expert] -= need
            dest[expert] = dest.get(expert, 0.0) + need
            return amount
        expert = max(source, key=lambda e: (source[e], -e))
        load = source.pop(expert)
        dest[expert] = dest.get(expert, 0.0) + load
        moved += load
    return moved


def plan_layer(
    loads: np.ndarray, shape: ClusterShape, groups: np.ndarray, node_slack: float = DEFAULT_NODE_SLACK
) -> LayerPlan:
    """Place one layer. loads: [E] float >= 0; groups: [E] group index per expert."""
    num_gpus, num_experts = len(shape.node_of_gpu), len(loads)
    if num_experts > num_gpus * shape.slots_per_gpu:
        raise ValueError(f"{num_experts} experts do not fit {num_gpus} GPUs x {shape.slots_per_gpu} slots")
    # zero-load experts still need a slot; a tiny load keeps them in the arithmetic
    total = float(loads.sum())
    work = np.maximum(loads.astype(float), total * 1e-9 / num_experts if total > 0 else 1.0)
    gpus_per_node = np.bincount(np.array(shape.node_of_gpu), minlength=shape.num_nodes)
    node_share = gpus_per_node / num_gpus
    num_groups = int(groups.max()) + 1
    group_size = np.bincount(groups, minlength=num_groups)
    group_loads = np.bincount(groups, weights=work, minlength=num_groups)
    # a node holds at most as many groups as its slots allow, and no more than its even count
    slot_limit = gpus_per_node * shape.slots_per_gpu // int(group_size.max())
    even_limit = np.ceil(num_groups * node_share).astype(int)
    max_groups = np.maximum(np.minimum(slot_limit, even_limit), 1)
    if max_groups.sum() < num_groups:
        raise ValueError(f"{num_groups} groups of {int(group_size.max())} experts do not fit the nodes' slots")
    home_of_group = assign_home_nodes(group_loads, node_share, max_groups, node_slack)
    node_slots = gpus_per_node * shape.slots_per_gpu
    node_pieces = spill_between_nodes(work, home_of_group[groups], node_share, node_slots, node_slack)
    experts: list[list[int]] = [[] for _ in range(num_gpus)]
    served: list[list[float]] = [[] for _ in range(num_gpus)]
    for node, pieces in enumerate(node_pieces):
        gpus = shape.gpus_of(node)
        for gpu, held in zip(gpus, pack_node(pieces, len(gpus), shape.slots_per_gpu), strict=True):
            for expert in sorted(held):
                experts[gpu].append(expert)
                served[gpu].append(held[expert])
    shares = [[load / work[e] for e, load in zip(es, ls, strict=True)] for es, ls in zip(experts, served, strict=True)]
    return LayerPlan(experts, _normalise_shares(experts, shares, num_experts))


def plan_layer_with_shared(
    loads: np.ndarray,
    shape: ClusterShape,
    groups: np.ndarray,
    num_shared: int = 0,
    node_slack: float = DEFAULT_NODE_SLACK,
) -> LayerPlan:
    """Place one layer whose last `num_shared` of loads [E + S] are shared experts; groups: [E] for
    the routed ones. Each shared expert takes one slot on every GPU, share 1 / GPUs there."""
    if not num_shared:
        return plan_layer(loads, shape, groups, node_slack)
    if shape.slots_per_gpu <= num_shared:
        raise ValueError(
            f"{shape.slots_per_gpu} slots per GPU leave none for routed experts beside {num_shared} shared"
        )
    routed_shape = ClusterShape(shape.node_of_gpu, shape.slots_per_gpu - num_shared)
    routed = plan_layer(loads[:-num_shared], routed_shape, groups, node_slack)
    shared_ids = list(range(len(loads) - num_shared, len(loads)))
    share = 1.0 / len(shape.node_of_gpu)
    return LayerPlan(
        [experts + shared_ids for experts in routed.experts],
        [shares + [share] * num_shared for shares in routed.shares],
    )


def placed_groups(num_routed: int, num_groups: int | None, num_shared: int = 0) -> np.ndarray:
    """Group per placed expert id (routed, then shared): each shared expert a group of its own."""
    routed = group_of_experts(num_routed, num_groups)
    first = int(routed.max()) + 1 if num_routed else 0
    return np.concatenate([routed, np.arange(first, first + num_shared)])


def _normalise_shares(experts: list[list[int]], shares: list[list[float]], num_experts: int) -> list[list[float]]:
    """Make each expert's shares sum to exactly 1 (rounding in the arithmetic above)."""
    sums = np.zeros(num_experts)
    for es, ss in zip(experts, shares, strict=True):
        np.add.at(sums, es, ss)
    return [[s / sums[e] for e, s in zip(es, ss, strict=True)] for es, ss in zip(experts, shares, strict=True)]


def plan_placement_layers(
    loads: np.ndarray,
    shape: ClusterShape,
    num_groups: int | None = None,
    node_slack: float = DEFAULT_NODE_SLACK,
    num_shared: int = 0,
) -> PlacementPlan:
    """Plan every layer of loads [layers, experts]; the last `num_shared` experts are shared ones
    (plan_layer_with_shared); figures as computed by placement_figures."""
    from moe_serve.cluster.placement_figures import plan_figures

    if loads.ndim != 2 or (loads < 0).any() or not np.isfinite(loads).all():
        raise ValueError("loads must be a finite, non-negative [layers, experts] array")
    started = time.perf_counter()
    groups = group_of_experts(loads.shape[1] - num_shared, num_groups)
    layers = [plan_layer_with_shared(layer_loads, shape, groups, num_shared, node_slack) for layer_loads in loads]
    plan = PlacementPlan(layers)
    plan.figures = plan_figures(
        loads, layers, shape, placed_groups(loads.shape[1] - num_shared, num_groups, num_shared)
    )
    plan.figures["seconds"] = time.perf_counter() - started
    return plan
