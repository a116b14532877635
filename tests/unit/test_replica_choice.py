"""Replica choice in the router: least outstanding work, failed replicas avoided, large segments split."""

from __future__ import annotations

import math
import random

import torch

from moe_serve.cluster.placement import ExpertKey
from moe_serve.worker_record import WorkerRecord
from router_service.planner import assign_workers
from router_service.registry import InProcessRegistry


def registry_with(replicas: dict[str, list[int]]) -> InProcessRegistry:
    registry = InProcessRegistry()
    for worker_id, experts in replicas.items():
        registry.register(WorkerRecord(worker_id, f"{worker_id}:1", tuple(ExpertKey(0, e) for e in experts)))
    return registry


def test_failed_replicas_are_avoided_while_a_healthy_one_exists() -> None:
    registry = registry_with({"a": [0], "b": [0], "c": [0]})
    load = {"a": math.inf, "b": math.inf, "c": 50.0}
    rng = random.Random(0)
    for _ in range(50):
        (batch,) = assign_workers(0, {0: torch.arange(4)}, registry, lambda r: load[r.worker_id], rng)
        assert batch.worker.worker_id == "c"
    load["c"] = math.inf  # all failed: still try one rather than fail without trying
    (batch,) = assign_workers(0, {0: torch.arange(4)}, registry, lambda r: load[r.worker_id], rng)
    assert batch.worker.worker_id in {"a", "b", "c"}


def test_power_of_two_choices_prefers_less_loaded() -> None:
    registry = registry_with({"a": [0], "b": [0]})
    load = {"a": 1000.0, "b": 0.0}
    rng = random.Random(1)
    chosen = [
        assign_workers(0, {0: torch.arange(2)}, registry, lambda r: load[r.worker_id], rng)[0].worker.worker_id
        for _ in range(20)
    ]
    assert set(chosen) == {"b"}


def test_large_segment_is_split_over_the_least_loaded_healthy_replicas() -> None:
    registry = registry_with({"a": [0, 1], "b": [0], "c": [0], "d": [1]})
    load = {"a": 10.0, "b": 0.0, "c": math.inf, "d": 5.0}
    positions = torch.arange(600)
    batches = assign_workers(
        0,
        {0: positions, 1: torch.arange(600, 610)},
        registry,
        lambda r: load[r.worker_id],
        random.Random(2),
        split_min_rows=256,
    )
    by_worker = {b.worker.worker_id: b for b in batches}
    assert "c" not in by_worker  # quarantined
    rows_of_expert_0 = {w: b.counts[b.experts.index(0)] for w, b in by_worker.items() if 0 in b.experts}
    assert rows_of_expert_0 == {"a": 300, "b": 300}
    covered = torch.cat([b.positions for b in batches]).sort().values
    assert torch.equal(covered, torch.arange(610))  # every row exactly once
    # below twice the split size: one replica takes the whole segment
    small = assign_workers(
        0, {0: torch.arange(300)}, registry, lambda r: load[r.worker_id], random.Random(3), split_min_rows=256
    )
    assert len(small) == 1 and small[0].num_rows == 300


def test_a_replica_holding_the_expert_resident_wins_while_its_load_allows() -> None:
    registry = registry_with({"a": [0], "b": [0]})
    resident = {"a": False, "b": True}  # only b has expert 0 in its device tier (offloading workers)
    load = {"a": 0.0, "b": 200.0}
    rng = random.Random(2)

    def choose() -> str:
        return assign_workers(
            0,
            {0: torch.arange(2)},
            registry,
            lambda r: load[r.worker_id],
            rng,
            resident=lambda r, key: resident[r.worker_id],
        )[0].worker.worker_id

    assert {choose() for _ in range(20)} == {"b"}  # 200 queued rows cost less than loading the expert
    load["b"] = 1000.0  # far busier: the load wins over residency
    assert {choose() for _ in range(20)} == {"a"}
