"""DeepSeek's EPLB policies, reimplemented from their published description, as the benchmark's baseline.

deepseek-ai/EPLB `rebalance_experts` has two policies; both split an expert's rows equally over its
replicas:
- hierarchical (when groups divide evenly over nodes): pack whole groups onto nodes, heaviest
  first onto the lightest node with a free group place (every node gets the same number of groups);
  within each node, replicate its experts up to the node's physical slots (one more replica at a
  time, to the expert with the highest load per replica); pack the replicas onto the node's GPUs
  the same way, heaviest first onto the lightest GPU with a free slot (replicas of one expert may
  share a GPU, as in the original);
- global: the same with one group and one node, over all GPUs.
Placements come back in the planner's form (placement_planner.LayerPlan), with equal shares.
"""

from __future__ import annotations

import numpy as np

from moe_serve.cluster.placement_planner import ClusterShape, LayerPlan


def balanced_packing(weights: np.ndarray, packs: int) -> np.ndarray:
    """Pack index per item: heaviest first onto the lightest pack that has fewer than n / packs items."""
    per_pack = len(weights) // packs
    pack_load, pack_items = np.zeros(packs), np.zeros(packs, dtype=int)
    index = np.full(len(weights), -1)
    for item in np.argsort(-weights, kind="stable"):
        open_packs = np.flatnonzero(pack_items < per_pack)
        pack = open_packs[np.argmin(pack_load[open_packs])]
        index[item] = pack
        pack_load[pack] += weights[item]
        pack_items[pack] += 1
    return index


def replicate_experts(weights: np.ndarray, physical: int) -> tuple[np.ndarray, np.ndarray]:
    """(logical id per physical replica, replica count per logical expert): each extra replica goes to
    the expert with the highest load per replica."""
    counts = np.ones(len(weights), dtype=int)
    logical = list(range(len(weights)))
    for _ in range(physical - len(weights)):
        expert = int(np.argmax(weights / counts))
        logical.append(expert)
        counts[expert] += 1
    return np.array(logical), counts


def eplb_layer(loads: np.ndarray, shape: ClusterShape, num_groups: int, hierarchical: bool = True) -> LayerPlan:
    """One layer placed by EPLB's hierarchical policy (or its global one: one group, one node)."""
    num_gpus = len(shape.node_of_gpu)
    nodes = shape.num_nodes if hierarchical else 1
    groups = num_groups if hierarchical else 1
    gpus_per_node, physical_per_node = num_gpus // nodes, num_gpus * shape.slots_per_gpu // nodes
    group_size = len(loads) // groups
    group_node = balanced_packing(loads.reshape(groups, group_size).sum(axis=1), nodes)
    experts: list[list[int]] = [[] for _ in range(num_gpus)]
    for node in range(nodes):
        # the node's experts, its groups in packing order (the original's "mlog" numbering)
        members = np.concatenate(
            [np.arange(g * group_size, (g + 1) * group_size) for g in np.flatnonzero(group_node == node)]
        )
        logical, counts = replicate_experts(loads[members], physical_per_node)
        gpu_of_replica = balanced_packing(loads[members][logical] / counts[logical], gpus_per_node)
        for replica, local in enumerate(logical):
            experts[node * gpus_per_node + gpu_of_replica[replica]].append(int(members[local]))
    replicas = np.bincount(np.concatenate([np.array(e, dtype=int) for e in experts]), minlength=len(loads))
    shares = [[1.0 / replicas[e] for e in gpu] for gpu in experts]
    return LayerPlan(experts, shares)
