"""Scaling a running stack through its deployment controller, under steady load: no request fails,
every answer stays exact, new replicas take traffic, removed ones leave without losing work."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import ray
import torch

from expert_service.actor import ExpertWorkerActor
from moe_serve.cluster.controller import REGISTRATION_TIMEOUT_S
from moe_serve.cluster.launcher import launch_stack
from moe_serve.cluster.placement import ExpertKey
from moe_serve.config import UpSettings
from moe_serve.worker_record import WorkerRecord
from tests.helpers import (
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
    wait_until,
)

# heartbeats every second (ttl/3): the load the balancer and the autoscaler read is at most 1 s old
SETTINGS = UpSettings(port=0, workers=2, registry_ttl_s=3.0)


@pytest.fixture(scope="module")
def scaling_stack(ray_cluster, checkpoints):
    """One stack (about 5 s to start) for the tests that change its placement by hand, in this file's
    order: the first two leave it as they found it (two workers, one replica of every expert), so
    the rebalance starts from the standard placement too; the scale to three workers, last, replaces
    whatever placement it finds."""
    stack = launch_stack(SETTINGS, checkpoints(torch.float32), worker_actor=ExpertWorkerActor)
    yield stack
    stack.stop()


@pytest.fixture
def autoscaling_stack(ray_cluster, checkpoints):
    """A stack of its own: the autoscaling policy, once started, runs until the stack stops."""
    stack = launch_stack(SETTINGS, checkpoints(torch.float32), worker_actor=ExpertWorkerActor)
    yield stack
    stack.stop()


@contextmanager
def steady_load(stack, block: torch.nn.Module, tokens: int = 24) -> Iterator[dict]:
    """Requests back to back from a thread; counts answers, failures and wrong answers."""
    outcome = {"answered": 0, "failures": []}
    stop = threading.Event()

    def run() -> None:
        channel, stub = kserve_stub(stack.address)
        seed = 0
        with channel:
            while not stop.is_set():
                seed += 1
                hidden = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))
                try:
                    result = response_tensors(stub.ModelInfer(infer_request(stack.model_name, hidden), timeout=30))
                except grpc.RpcError as error:
                    outcome["failures"].append(f"{error.code().name}: {error.details()}")
                    continue
                if not torch.allclose(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5):
                    outcome["failures"].append(f"wrong answer for seed {seed}")
                outcome["answered"] += 1

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield outcome
    finally:
        stop.set()
        thread.join(60)


def answered_more(outcome: dict, than: int, what: str) -> None:
    """Wait for steady load to get answers past `than` (or a failure, which the test then reports)."""
    wait_until(lambda: outcome["answered"] > than or outcome["failures"], 60, what, poll_s=0.05)


def replica_counts(stack) -> dict[ExpertKey, int]:
    counts: dict[ExpertKey, int] = {}
    for record in stack.workers:
        for key in record.experts:
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_scale_one_expert_up_and_down_under_load(scaling_stack, checkpoints) -> None:
    stack = scaling_stack
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    workers_before = len(stack.workers)
    with steady_load(stack, block) as outcome:
        answered_more(outcome, 4, "answers before the change")
        ray.get(stack.controller.scale_expert.remote(3, 3))  # expert 3, every layer, 3 replicas
        counts = replica_counts(stack)
        assert counts[ExpertKey(0, 3)] == counts[ExpertKey(1, 3)] == 3
        assert counts[ExpertKey(0, 2)] == 1
        answered_more(outcome, outcome["answered"] + 4, "answers with three replicas")
        ray.get(stack.controller.scale_expert.remote(3, 1))
        assert replica_counts(stack)[ExpertKey(0, 3)] == 1
        answered_more(outcome, outcome["answered"] + 4, "answers after scaling down")
    assert outcome["failures"] == [] and outcome["answered"] > 10
    assert len(stack.workers) == workers_before == 2


def test_new_replicas_take_traffic_and_split_large_batches(scaling_stack, checkpoints) -> None:
    stack = scaling_stack
    ray.get(stack.controller.scale_expert.remote(0, 2, 0))  # expert 0 of layer 0: 2 replicas
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    # a batch whose rows mostly go to expert 0: it is split over both replicas (split_min_rows 256)
    direction = block.gate.weight[0].detach() / block.gate.weight[0].detach().norm()
    hidden = torch.randn(1200, 64, generator=torch.Generator().manual_seed(1)) + 6 * direction
    channel, stub = kserve_stub(stack.address)
    with channel:
        result = response_tensors(stub.ModelInfer(infer_request(stack.model_name, hidden), timeout=60))
    torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)

    def holders() -> list[WorkerRecord]:
        return [r for r in stack.workers if ExpertKey(0, 0) in r.experts]

    # a registry heartbeat (every ttl/3 s) carries the workers' load: wait for one, not a fixed 4 s
    wait_until(lambda: all(r.load["rows_per_s"] > 0 for r in holders()), 15, "both replicas' load", poll_s=0.25)
    assert len(holders()) == 2
    assert all(r.load["rows_per_s"] > 0 for r in holders()), [r.load for r in holders()]
    # back to one replica (the dedicated one goes) for the tests after this one on the shared stack
    ray.get(stack.controller.scale_expert.remote(0, 1, 0))
    assert len(holders()) == 1 and len(stack.workers) == 2


def test_rebalance_replicates_the_hot_expert(scaling_stack, checkpoints) -> None:
    stack = scaling_stack
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    direction = block.gate.weight[5].detach() / block.gate.weight[5].detach().norm()
    channel, stub = kserve_stub(stack.address)
    ray.get(stack.controller.rebalance.remote())  # start the load window
    with channel:
        for seed in range(6):
            hidden = torch.randn(200, 64, generator=torch.Generator().manual_seed(seed)) + 6 * direction
            stub.ModelInfer(infer_request(stack.model_name, hidden), timeout=60)
        report = ray.get(stack.controller.rebalance.remote())
        assert report["applied"], report
        assert report["layers"][0]["planned"] < report["layers"][0]["imbalance"]
        assert replica_counts(stack)[ExpertKey(0, 5)] >= 2
        hidden = torch.randn(40, 64, generator=torch.Generator().manual_seed(99)) + 6 * direction
        result = response_tensors(stub.ModelInfer(infer_request(stack.model_name, hidden), timeout=60))
    torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
    status = ray.get(stack.controller.status.remote())
    assert any("rebalanced" in event for event in status["events"])
    assert all(WorkerRecord.from_json(text).experts for text in status["workers"])


def test_scale_workers_replaces_placement_without_failing_requests(scaling_stack, checkpoints) -> None:
    stack = scaling_stack
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    before = {r.worker_id for r in stack.workers}
    with steady_load(stack, block) as outcome:
        answered_more(outcome, 2, "answers before the change")
        ray.get(stack.controller.scale_workers.remote(3))
        answered_more(outcome, outcome["answered"] + 2, "answers after the change")
    after = stack.workers
    assert outcome["failures"] == [] and outcome["answered"] > 5
    assert len(after) == 3 and not before & {r.worker_id for r in after}
    assert all(count == 1 for count in replica_counts(stack).values())
    assert len(replica_counts(stack)) == 16


@pytest.mark.slow
def test_autoscaling_policy_adds_a_worker_under_sustained_queueing(autoscaling_stack, checkpoints) -> None:
    stack = autoscaling_stack
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    # any queued row counts as busy; decide every 0.5 s after 2 busy checks in a row; at most 3 workers
    policy = {"target_queued_rows": 0, "window": 2, "minimum": 2, "maximum": 3}
    stack.controller.run_policies.remote(0.0, policy, 0.5)

    def decided() -> bool:
        return any("autoscale: 2 -> 3" in event for event in ray.get(stack.controller.status.remote())["events"])

    # four clients at once keep batches waiting for a compute thread; the policy samples queued
    # rows at heartbeats, and one client's batches start computing as soon as they arrive
    with steady_load(stack, block, tokens=400) as steady:
        with contextlib.ExitStack() as extra:
            outcomes = [extra.enter_context(steady_load(stack, block, tokens=400)) for _ in range(3)]
            wait_until(decided, 120, "the policy's decision to scale up under load", poll_s=0.5)
        # the new workers import torch and load their experts: on 2 busy cores that can take a minute,
        # so they start under one client's load (which also keeps the policy from scaling back down)
        wait_until(lambda: len(stack.workers) >= 3, REGISTRATION_TIMEOUT_S, "the third worker", poll_s=0.5)
    assert all(outcome["failures"] == [] for outcome in [steady, *outcomes])
    assert steady["answered"] > 0
