"""Benchmark section: node-aware expert placement against DeepSeek's EPLB policies.

Every policy places the same load matrices [layers, experts] on the same cluster (default: 4 nodes x
8 GPUs x 9 slots, 256 experts in 8 groups, 58 layers, the DeepSeek-V3 shape) and is scored by
placement_figures: mean and worst-layer max/mean GPU load, and locality (per group, the share of
its load served on the node serving most of it; weighted by load over groups and layers).

Load matrices: lognormal(0, 0.8) and lognormal(0, 1.2) per expert; Zipf (per layer, expert loads
proportional to rank^-1 over a random permutation of the experts); and, when given, a recorded
trace (rows per expert from a served run's router, GetExpertLoad).

Policies: EPLB hierarchical and global (bench/eplb_reference.py, equal replica shares), the
node-first greedy (global replication, then each replica onto its group's home node when it has a
free slot), and the placement planner (weighted shares).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moe_serve.bench.eplb_reference import balanced_packing, eplb_layer, replicate_experts
from moe_serve.cluster.placement_figures import check_plan, plan_figures
from moe_serve.cluster.placement_planner import ClusterShape, LayerPlan, group_of_experts, plan_layer

LayerPolicy = Callable[[np.ndarray, ClusterShape, int], LayerPlan]


def node_first_greedy(loads: np.ndarray, shape: ClusterShape, num_groups: int) -> LayerPlan:
    """Global replication, then replicas heaviest first onto the least-loaded GPU of their group's home
    node with a free slot (any node's when the home node is full); equal shares."""
    num_gpus = len(shape.node_of_gpu)
    logical, counts = replicate_experts(loads, num_gpus * shape.slots_per_gpu)
    group_size = len(loads) // num_groups
    home = balanced_packing(loads.reshape(num_groups, group_size).sum(axis=1), shape.num_nodes)
    experts: list[list[int]] = [[] for _ in range(num_gpus)]
    gpu_load = np.zeros(num_gpus)
    for replica in np.argsort(-(loads[logical] / counts[logical]), kind="stable"):
        expert = int(logical[replica])
        free = [g for g in range(num_gpus) if len(experts[g]) < shape.slots_per_gpu and expert not in experts[g]]
        local = [g for g in free if shape.node_of_gpu[g] == home[expert // group_size]]
        gpu = min(local or free, key=lambda g: (gpu_load[g], g))
        experts[gpu].append(expert)
        gpu_load[gpu] += loads[expert] / counts[expert]
    return LayerPlan(experts, [[1.0 / counts[e] for e in gpu] for gpu in experts])


def planner_layer(loads: np.ndarray, shape: ClusterShape, num_groups: int) -> LayerPlan:
    return plan_layer(loads, shape, group_of_experts(len(loads), num_groups))


POLICIES: dict[str, LayerPolicy] = {
    "eplb-hierarchical": lambda loads, shape, groups: eplb_layer(loads, shape, groups, hierarchical=True),
    "eplb-global": lambda loads, shape, groups: eplb_layer(loads, shape, groups, hierarchical=False),
    "greedy-node-first": node_first_greedy,
    "planner": planner_layer,
}


def load_matrices(layers: int, experts: int, seed: int, trace: Path | None = None) -> dict[str, np.ndarray]:
    """The benchmark's load matrices, [layers, experts] each, seeded."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, experts + 1)
    matrices = {
        "lognormal-0.8": rng.lognormal(0.0, 0.8, size=(layers, experts)),
        "lognormal-1.2": rng.lognormal(0.0, 1.2, size=(layers, experts)),
        "zipf-1.0": np.stack([zipf[rng.permutation(experts)] for _ in range(layers)]),
    }
    if trace is not None:
        matrices[f"trace:{trace.name}"] = np.load(trace).astype(float)
    return matrices


def score_policy(name: str, loads: np.ndarray, shape: ClusterShape, num_groups: int) -> dict[str, float]:
    """The policy's figures on `loads` [layers, experts], its time, and a check of its placement."""
    started = time.perf_counter()
    layers = [POLICIES[name](layer_loads, shape, num_groups) for layer_loads in loads]
    seconds = time.perf_counter() - started
    check_plan(layers, loads.shape[1], shape.slots_per_gpu, distinct=not name.startswith("eplb"))
    figures = plan_figures(loads, layers, shape, group_of_experts(loads.shape[1], num_groups))
    return {**figures, "seconds": seconds}


def placement_comparison(
    nodes: int = 4,
    gpus_per_node: int = 8,
    slots_per_gpu: int = 9,
    num_groups: int = 8,
    layers: int = 58,
    experts: int = 256,
    seed: int = 0,
    trace: Path | None = None,
    trace_shape: tuple[int, int, int, int] | None = None,
) -> dict[str, Any]:
    """Figures of every policy on every load matrix. trace_shape: (nodes, GPUs per node, slots, groups)
    for the trace, whose expert count may differ from the synthetic matrices'."""
    shape = ClusterShape.uniform(nodes, gpus_per_node, slots_per_gpu)
    rows = []
    for name, matrix in load_matrices(layers, experts, seed, trace).items():
        matrix_shape, groups = shape, num_groups
        if name.startswith("trace:") and trace_shape is not None:
            matrix_shape = ClusterShape.uniform(*trace_shape[:3])
            groups = trace_shape[3]
        for policy in POLICIES:
            rows.append({"loads": name, "policy": policy, **score_policy(policy, matrix, matrix_shape, groups)})
    return {
        "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node, "slots_per_gpu": slots_per_gpu},
        "groups": num_groups,
        "layers": layers,
        "experts": experts,
        "seed": seed,
        "trace_shape": list(trace_shape) if trace is not None and trace_shape else None,
        "rows": rows,
    }
