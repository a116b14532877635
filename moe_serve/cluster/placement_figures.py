"""Figures of a placement: GPU load balance and group locality, the same for every policy.

- max/mean: per layer, the most loaded GPU's load over the mean GPU load (1.0 is perfect); a GPU's
  load is the sum over its slots of the slot's share times its expert's load.
- locality: per layer and group, the share of the group's load served on the node that serves the
  most of it; averaged over groups and layers weighted by load (1.0: every group on one node).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class LayerPlacement(Protocol):
    experts: list[list[int]]
    shares: list[list[float]]


def gpu_loads(loads: np.ndarray, layer: LayerPlacement) -> np.ndarray:
    """[GPUs] load per GPU of one layer; loads: [E]."""
    return np.array(
        [
            sum(loads[e] * s for e, s in zip(es, ss, strict=True))
            for es, ss in zip(layer.experts, layer.shares, strict=True)
        ]
    )


def node_group_loads(
    loads: np.ndarray, layer: LayerPlacement, node_of_gpu: Sequence[int], groups: np.ndarray
) -> np.ndarray:
    """[nodes, groups] load of each group served on each node."""
    served = np.zeros((max(node_of_gpu) + 1, int(groups.max()) + 1))
    for gpu, (es, ss) in enumerate(zip(layer.experts, layer.shares, strict=True)):
        for e, s in zip(es, ss, strict=True):
            served[node_of_gpu[gpu], groups[e]] += loads[e] * s
    return served


def plan_figures(
    loads: np.ndarray, layers: Sequence[LayerPlacement], shape: object, groups: np.ndarray
) -> dict[str, float]:
    """mean and worst max/mean GPU load over layers, and locality, for loads [layers, E]."""
    node_of_gpu = shape.node_of_gpu  # type: ignore[attr-defined]
    ratios, local, total = [], 0.0, 0.0
    for layer_loads, layer in zip(loads, layers, strict=True):
        per_gpu = gpu_loads(layer_loads, layer)
        mean = per_gpu.mean()
        ratios.append(float(per_gpu.max() / mean) if mean > 0 else 1.0)
        served = node_group_loads(layer_loads, layer, node_of_gpu, groups)
        local += float(served.max(axis=0).sum())
        total += float(served.sum())
    return {
        "mean_max_over_mean": float(np.mean(ratios)),
        "worst_layer_max_over_mean": float(np.max(ratios)),
        "locality": local / total if total > 0 else 1.0,
    }


def check_plan(layers: Sequence[LayerPlacement], num_experts: int, slots_per_gpu: int, distinct: bool = True) -> None:
    """Raise ValueError unless every expert has a slot, no GPU exceeds its slots, no GPU holds an
    expert twice (unless not `distinct`: EPLB's packing allows it), and each expert's shares are
    non-negative and sum to 1."""
    for index, layer in enumerate(layers):
        sums = np.zeros(num_experts)
        for es, ss in zip(layer.experts, layer.shares, strict=True):
            if len(es) > slots_per_gpu:
                raise ValueError(f"layer {index}: a GPU holds {len(es)} experts in {slots_per_gpu} slots")
            if distinct and len(set(es)) != len(es):
                raise ValueError(f"layer {index}: a GPU holds one expert twice")
            if min(ss, default=0.0) < 0:
                raise ValueError(f"layer {index}: a negative replica share")
            np.add.at(sums, es, ss)
        if not np.allclose(sums, 1.0, atol=1e-6):
            missing = np.flatnonzero(~np.isclose(sums, 1.0, atol=1e-6))[:5].tolist()
            raise ValueError(f"layer {index}: the shares of experts {missing} do not sum to 1 (unplaced?)")
