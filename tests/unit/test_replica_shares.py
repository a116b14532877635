"""The router splits an expert's rows across its replicas in the placement planner's proportions."""

from __future__ import annotations

import math
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from moe_serve.cluster.placement import ExpertKey
from moe_serve.cluster.placement_figures import gpu_loads
from moe_serve.cluster.placement_planner import ClusterShape, group_of_experts, plan_layer
from moe_serve.worker_record import WorkerRecord
from router_service.metrics import RouterMetrics
from router_service.planner import WorkerBatch, assign_workers, cross_node_rows, split_rows_by_shares
from router_service.registry import InProcessRegistry

shares_strategy = st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=8).filter(
    lambda s: sum(s) > 1e-6
)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(min_value=0, max_value=5000), shares=shares_strategy, seed=st.integers(0, 2**32 - 1))
def test_split_sums_to_rows_each_within_one_row_of_its_share(rows: int, shares: list[float], seed: int) -> None:
    counts = split_rows_by_shares(rows, shares, random.Random(seed))
    assert sum(counts) == rows and min(counts) >= 0
    for count, share in zip(counts, shares, strict=True):
        exact = rows * share / sum(shares)
        assert abs(count - exact) < 1 + 1e-9  # its floor or its ceiling


def test_expected_counts_match_the_shares_even_at_one_row() -> None:
    shares = [0.5, 0.3, 0.15, 0.05]
    rng = random.Random(0)
    totals = np.zeros(4)
    draws = 20000
    for _ in range(draws):
        totals += split_rows_by_shares(1, shares, rng)
    assert np.allclose(totals / draws, shares, atol=0.01)


def registry_with(replicas: dict[str, list[int]]) -> InProcessRegistry:
    registry = InProcessRegistry()
    for worker_id, experts in replicas.items():
        registry.register(WorkerRecord(worker_id, f"{worker_id}:1", tuple(ExpertKey(0, e) for e in experts)))
    return registry


def rows_per_worker(batches: list, expert: int) -> dict[str, int]:
    return {b.worker.worker_id: b.counts[b.experts.index(expert)] for b in batches if expert in b.experts}


def test_assign_workers_follows_shares_and_renormalises_over_healthy_replicas() -> None:
    registry = registry_with({"a": [0], "b": [0], "c": [0, 1]})
    shares = {ExpertKey(0, 0): {"a": 0.6, "b": 0.3, "c": 0.1}}
    load = {"a": 0.0, "b": 0.0, "c": 0.0}
    segments = {0: torch.arange(1000), 1: torch.arange(1000, 1010)}
    batches = assign_workers(
        0, segments, registry, lambda r: load[r.worker_id], random.Random(1), replica_shares=lambda k: shares.get(k, {})
    )
    assert rows_per_worker(batches, 0) == {"a": 600, "b": 300, "c": 100}
    assert rows_per_worker(batches, 1) == {"c": 10}  # no shares: the one replica, as before
    covered = torch.cat([b.positions for b in batches]).sort().values
    assert torch.equal(covered, torch.arange(1010))  # every row exactly once
    load["b"] = math.inf  # a failed replica: its share goes to the others in proportion
    batches = assign_workers(
        0, {0: torch.arange(700)}, registry, lambda r: load[r.worker_id], random.Random(1), replica_shares=shares.get
    )
    assert rows_per_worker(batches, 0) == {"a": 600, "c": 100}


def test_routed_rows_reproduce_the_planned_gpu_loads() -> None:
    """Rows routed with the plan's shares land on each GPU as the planner computed its load."""
    rng = np.random.default_rng(3)
    loads = np.round(rng.lognormal(0, 1.2, 64) * 200)
    shape = ClusterShape.uniform(2, 4, 9)
    plan = plan_layer(loads, shape, group_of_experts(64, 4))
    workers = {f"gpu{g}": experts for g, experts in enumerate(plan.experts)}
    registry = registry_with(workers)
    table: dict[ExpertKey, dict[str, float]] = {}
    for g, (experts, shares) in enumerate(zip(plan.experts, plan.shares, strict=True)):
        for expert, share in zip(experts, shares, strict=True):
            table.setdefault(ExpertKey(0, expert), {})[f"gpu{g}"] = share
    segments, start = {}, 0
    for expert, rows in enumerate(loads.astype(int)):
        if rows:
            segments[expert] = torch.arange(start, start + rows)
            start += rows
    batches = assign_workers(0, segments, registry, lambda r: 0.0, random.Random(0), replica_shares=table.get)
    routed = {b.worker.worker_id: b.num_rows for b in batches}
    planned = gpu_loads(loads, plan)
    for g, expected in enumerate(planned):
        # each replicated expert may put one row more or less on a GPU than its exact share
        assert abs(routed.get(f"gpu{g}", 0) - expected) <= len(plan.experts[g])


def test_cross_node_rows_counts_rows_off_their_tokens_main_node() -> None:
    def batch(worker: str, node: str, positions: list[int]) -> WorkerBatch:
        record = WorkerRecord(worker, f"{worker}:1", (ExpertKey(0, 0),), node_id=node)
        return WorkerBatch(record, (0,), (len(positions),), torch.tensor(positions))

    # 2 slots per token: token 0 = positions 0, 1; token 1 = 2, 3; token 2 = 4, 5
    same_node = [batch("a", "n1", [0, 2]), batch("b", "n1", [1, 3])]
    assert cross_node_rows(same_node, 2) == 0
    split = [batch("a", "n1", [0, 2, 4, 5]), batch("c", "n2", [1, 3])]
    assert cross_node_rows(split, 2) == 2  # tokens 0 and 1 each have one row off node n1


def test_a_shared_expert_row_goes_to_its_tokens_main_node() -> None:
    """Expert 2 (shared) on both nodes: each token's shared row joins its routed rows; none cross."""
    registry = InProcessRegistry()
    registry.register(WorkerRecord("a", "a:1", (ExpertKey(0, 0), ExpertKey(0, 2)), node_id="n1"))
    registry.register(WorkerRecord("b", "b:1", (ExpertKey(0, 1), ExpertKey(0, 2)), node_id="n2"))
    table = {ExpertKey(0, 2): {"a": 0.5, "b": 0.5}}
    # 2 slots per token (1 routed, 1 shared): tokens 0, 2, 3 routed to expert 0 (n1), token 1 to expert 1 (n2)
    segments = {0: torch.tensor([0, 4, 6]), 1: torch.tensor([2]), 2: torch.tensor([1, 3, 5, 7])}
    args = (0, segments, registry, lambda r: 0.0, random.Random(0))
    shares = lambda key: table.get(key, {})  # noqa: E731
    spread = assign_workers(*args, replica_shares=shares)
    assert cross_node_rows(spread, 2) > 0  # split by shares in token order: some shared rows cross
    batches = assign_workers(*args, replica_shares=shares, follow_tokens=frozenset({2}), slots_per_token=2)
    assert cross_node_rows(batches, 2) == 0
    shared_on = {b.worker.worker_id: sorted(p for p in b.positions.tolist() if p % 2) for b in batches}
    assert shared_on == {"a": [1, 5, 7], "b": [3]}
    # one replica: all its rows in one segment, as without token following
    registry.register(WorkerRecord("b", "b:1", (ExpertKey(0, 1),), node_id="n2"))
    single = assign_workers(*args, follow_tokens=frozenset({2}), slots_per_token=2)
    (a,) = [batch for batch in single if batch.worker.worker_id == "a"]
    assert a.experts == (0, 2) and a.counts == (3, 4)


def test_cross_node_rows_are_exported_per_layer() -> None:
    """moe_serve.router.cross_node_rows: one series per MoE layer (0 until rows cross), read from the
    dispatcher's counter at each collection."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    keys = [ExpertKey(layer, e) for layer in (1, 2) for e in range(3)]
    metrics = RouterMetrics(SimpleNamespace(meter=meter), "m", InProcessRegistry(), keys)  # type: ignore[arg-type]

    def exported() -> dict[str, int]:
        data = reader.get_metrics_data()
        points = [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "moe_serve.router.cross_node_rows"
            for point in metric.data.data_points
        ]
        assert all(set(point.attributes) == {"model", "layer"} for point in points)
        return {point.attributes["layer"]: point.value for point in points}

    assert exported() == {"1": 0, "2": 0}
    counts: Counter[int] = Counter()
    metrics.cross_node_rows = counts
    counts[2] += 5
    assert exported() == {"1": 0, "2": 5}


def test_shared_rows_of_two_experts_meet_on_one_node_in_token_order() -> None:
    registry = InProcessRegistry()
    for worker, node in (("a", "n1"), ("b", "n2")):
        registry.register(WorkerRecord(worker, f"{worker}:1", (ExpertKey(0, 0), ExpertKey(0, 1)), node_id=node))
    table = {ExpertKey(0, e): {"a": 0.5, "b": 0.5} for e in (0, 1)}
    # 100 tokens, top-2: token t's rows are positions 2t (expert 0) and 2t + 1 (expert 1)
    segments = {0: torch.arange(0, 200, 2), 1: torch.arange(1, 200, 2)}
    batches = assign_workers(0, segments, registry, lambda r: 0.0, random.Random(0), replica_shares=table.get)
    assert cross_node_rows(batches, 2) == 0
