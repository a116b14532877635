"""Stragglers: a frozen worker (SIGSTOP) is routed around. With a second replica of every expert, a batch
it sits on is hedged on the other replica once overdue for its size (the first delivery wins) and the
frozen one, a suspect, gets no new rows: every request answers exactly, far within its deadline. As the
only replica, a request gets DEADLINE_EXCEEDED at its deadline, or UNAVAILABLE naming the worker as soon
as the registry drops it for missed heartbeats, whichever comes first.

Real processes: a router, a gateway and `moe-serve worker` processes on the tiny FP32 Mixtral; the
bound and suspect logic itself is unit-tested in tests/unit/test_stragglers.py.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from tests.helpers import (
    ProcessStack,
    gateway_stats,
    infer_request,
    kserve_stub,
    paused,
    reference_blocks,
    reference_forward,
    registered_worker_ids,
    response_tensors,
    start_process_stack,
    wait_until,
)
from tests.integration.test_telemetry import scrape, total

TOKENS = 8
WARM_UP_REQUESTS = 24  # both layers, rows on both replicas: each replica has its own bound after it
CLIENTS = 3
FREEZE_S = 3.0
DEADLINE_S = 10.0
ANSWER_WITHIN_S = 2.0  # a hedge is sent once a batch is overdue (0.25 s on an idle machine)
SHORT_TTL_S = 2.0
DEADLINE_MARGIN_S = 0.25


def hidden_states(seed: int) -> torch.Tensor:
    return torch.randn(TOKENS, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def stack_of(checkpoints) -> Iterator[Callable[..., ProcessStack]]:
    """Starts a router (metrics on), a gateway and one worker (every expert) per TTL given."""
    started: list[ProcessStack] = []

    def start(*ttls_s: float) -> ProcessStack:
        stack = start_process_stack(
            checkpoints(torch.float32),
            [["--registry-ttl", str(ttl_s)] for ttl_s in ttls_s],
            router_args=("--metrics-port", "0"),
        )
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stack.stop()


class Client:
    """Requests (alternating layers) with a DEADLINE_S deadline, each answer checked against transformers."""

    def __init__(self, stack: ProcessStack, blocks: list[torch.nn.Module]) -> None:
        self.stack, self.blocks = stack, blocks
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.wrong = 0
        self.lock = threading.Lock()

    def run(self, seeds: range, until: float = math.inf) -> None:
        channel, stub = kserve_stub(self.stack.address)
        with channel:
            for seed in seeds:
                if time.monotonic() >= until:
                    return
                hidden, layer = hidden_states(seed), seed % 2
                sent = time.monotonic()
                try:
                    reply = stub.ModelInfer(infer_request(self.stack.model, hidden, layer=layer), timeout=DEADLINE_S)
                except grpc.RpcError as error:
                    with self.lock:
                        self.failures.append(f"{error.code().name}: {error.details()}")
                    continue
                elapsed = time.monotonic() - sent
                output = response_tensors(reply)["output"]
                right = torch.allclose(output, reference_forward(self.blocks[layer], hidden)[0], rtol=1e-5, atol=1e-5)
                with self.lock:
                    self.latencies.append(elapsed)
                    self.wrong += not right


def test_a_frozen_replica_is_hedged_around_and_no_request_waits_for_it(
    stack_of, checkpoints, reliability_record
) -> None:
    stack = stack_of(30.0, 30.0)  # registrations outlive the freeze: hedging, not expiry, is tested
    frozen = stack.workers[0]
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    warm, during, after = Client(stack, blocks), Client(stack, blocks), Client(stack, blocks)
    warm.run(range(WARM_UP_REQUESTS))
    with paused(frozen):
        frozen_at = time.monotonic()
        threads = [
            threading.Thread(target=during.run, args=(range(1000 * c, 1000 * (c + 1)), frozen_at + FREEZE_S))
            for c in range(1, CLIENTS + 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(FREEZE_S + DEADLINE_S + 5)
    # thawed: it answers its late calls (their duplicate deliveries ignored) and serves again
    after.run(range(10_000, 10_004))
    samples = scrape(stack.router.ready["metrics_address"])
    hedges = int(total(samples, "moe_serve_dispatch_hedges_total"))
    denied = int(total(samples, "moe_serve_dispatch_retries_denied_total"))

    assert warm.failures == during.failures == after.failures == []
    assert warm.wrong == during.wrong == after.wrong == 0
    assert len(during.latencies) >= CLIENTS * 3
    assert max(during.latencies) < ANSWER_WITHIN_S, sorted(during.latencies)[-5:]
    assert max(after.latencies) < ANSWER_WITHIN_S, after.latencies
    # the batches the frozen replica held were hedged; afterwards, a suspect, it got no rows
    assert 1 <= hedges <= 2 * CLIENTS
    assert denied == 0
    assert registered_worker_ids(stack.router.address) == {"worker-0", "worker-1"}
    wait_until(lambda: gateway_stats(stack.delivery_address).inflight_requests == 0, 10, "nothing left in flight")
    reliability_record(
        "worker-frozen-hedged",
        title="One of two replicas frozen",
        load=f"{CLIENTS} clients back to back, T={TOKENS}, both MoE layers, {DEADLINE_S:g} s deadline; "
        "2 workers, all experts",
        faults=f"SIGSTOP to one worker for {FREEZE_S:g} s, then SIGCONT (registration TTL 30 s: not dropped)",
        succeeded=len(warm.latencies) + len(during.latencies) + len(after.latencies),
        failed=0,
        wrong_answers=0,
        recover_s=None,
        batches_hedged=hedges,
        slowest_frozen_request_s=max(during.latencies),
        median_frozen_request_s=statistics.median(during.latencies),
        requests_during_freeze=len(during.latencies),
    )


def test_a_frozen_sole_replica_fails_requests_at_their_deadline_or_when_the_registry_drops_it(
    stack_of, checkpoints, reliability_record
) -> None:
    stack = stack_of(SHORT_TTL_S)
    worker = stack.workers[0]
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    channel, stub = kserve_stub(stack.address)
    with channel:
        for seed in range(4):  # warm: the worker has answered calls before it freezes
            stub.ModelInfer(infer_request(stack.model, hidden_states(seed)), timeout=DEADLINE_S)
        with paused(worker):
            frozen_at = time.monotonic()
            short_s = 1.0
            done_at: dict[str, float] = {}
            calls = {
                "long": stub.ModelInfer.future(infer_request(stack.model, hidden_states(10)), timeout=60),
                "short": stub.ModelInfer.future(infer_request(stack.model, hidden_states(11)), timeout=short_s),
            }
            for name, call in calls.items():
                call.add_done_callback(lambda _, name=name: done_at.setdefault(name, time.monotonic()))
            dropped_after_s = wait_until(
                lambda: "worker-0" not in registered_worker_ids(stack.router.address),
                SHORT_TTL_S + 5,
                "the registry dropped the frozen worker",
            )
            dropped_at = frozen_at + dropped_after_s
            long_error = calls["long"].exception(timeout=10)
            short_error = calls["short"].exception(timeout=10)
        # thawed: its next heartbeat registers it again, and it serves
        wait_until(lambda: "worker-0" in registered_worker_ids(stack.router.address), 10, "registered again")
        hidden = hidden_states(12)
        reply = stub.ModelInfer(infer_request(stack.model, hidden), timeout=DEADLINE_S)
        exact = torch.allclose(
            response_tensors(reply)["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5
        )

    assert isinstance(short_error, grpc.RpcError) and short_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    short_after_s = done_at["short"] - frozen_at
    assert short_s - 0.05 <= short_after_s <= short_s + DEADLINE_MARGIN_S
    assert isinstance(long_error, grpc.RpcError) and long_error.code() == grpc.StatusCode.UNAVAILABLE
    assert "worker worker-0 left the registry (missed heartbeats)" in long_error.details()
    # failed as soon as the worker was dropped (this poll saw the drop up to ~0.1 s late), not at 60 s
    long_after_drop_s = done_at["long"] - dropped_at
    assert -0.3 <= long_after_drop_s <= 1.0
    assert exact
    wait_until(lambda: gateway_stats(stack.delivery_address).inflight_requests == 0, 10, "nothing left in flight")
    reliability_record(
        "worker-frozen-sole-replica",
        title="The only replica frozen",
        load=f"2 concurrent requests, T={TOKENS}, deadlines 60 s and {short_s:g} s; 1 worker holding every expert",
        faults=f"SIGSTOP to the worker (registration TTL {SHORT_TTL_S:g} s) until it is dropped, then SIGCONT",
        succeeded=0,
        failed=2,
        wrong_answers=0,
        recover_s=None,
        expected_failures="DEADLINE_EXCEEDED at the short deadline; UNAVAILABLE once the registry dropped the worker",
        short_deadline_answered_after_s=short_after_s,
        worker_dropped_after_s=dropped_after_s,
        long_deadline_failed_after_drop_s=long_after_drop_s,
    )
