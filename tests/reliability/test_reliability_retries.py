"""Retries: bounded, with exponential backoff and jitter, capped by a retry budget so a failure of
many batches at once never multiplies the load; duplicate deliveries are ignored by the combine.

Unit tests pin the retry policy (router_service/retries.py) with a fake clock. Integration tests
run real processes: a replica killed under load is retried on the other one without a failed
request; a replica killed with hundreds of batches on it gets at most the budget's worth retried
(the rest fail at once, counted by moe_serve_dispatch_retries_denied_total); and a relay worker
delivers every batch in halves plus duplicates (garbage rows for slots already filled, the whole
batch again after the request finished) and the answers stay exact.
"""

from __future__ import annotations

import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.launcher import wait_until_ready
from moe_serve.cluster.processes import ServiceProcess, start_service_process
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime import codec
from moe_serve.runtime.errors import status_code_from_number
from router_service import retries
from router_service.retries import RetryBudget, backoff_s
from tests.helpers import (
    ROUTER_MODES,
    FakeClock,
    ProcessStack,
    gateway_stats,
    infer_request,
    internal_channel,
    internal_credentials,
    kserve_stub,
    paused,
    reference_blocks,
    reference_forward,
    registered_worker_ids,
    response_tensors,
    router_rows_sent,
    start_process_stack,
    wait_until,
)
from tests.integration.test_telemetry import scrape, total
from tests.reliability.test_reliability_shutdown import client_load, exact

# ------------------------------------------------------------------ the policy, with a fake clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(retries, "time", fake)
    return fake


def test_budget_starts_full_then_denies_and_counts(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.2, floor_per_s=5.0, cap=10.0)
    assert [budget.spend() for _ in range(10)] == [True] * 10
    assert not budget.spend() and not budget.spend()
    assert budget.denied == 2


def test_retries_are_capped_at_the_ratio_of_first_attempts_plus_the_floor(clock: FakeClock) -> None:
    """Every first attempt fails and asks for a retry: over a long run the budget grants
    ratio x attempts + floor x seconds (+ the initial cap), and denies the rest."""
    ratio, floor_per_s, cap = 0.2, 5.0, 10.0
    budget = RetryBudget(ratio, floor_per_s, cap)
    attempts, seconds, granted = 10_000, 20.0, 0
    for _ in range(attempts):
        clock.now += seconds / attempts
        budget.earn()
        granted += budget.spend()
    bound = cap + ratio * attempts + floor_per_s * seconds
    assert granted <= bound
    assert granted >= bound - cap - 1  # the budget is spent, not left unused
    assert budget.denied == attempts - granted
    assert granted / attempts < 0.25  # 1 in 4 failures retried at most: no amplification


def test_earned_retries_never_exceed_the_cap(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.5, floor_per_s=0.0, cap=3.0)
    for _ in range(1000):
        budget.earn()
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]


def test_the_floor_refills_over_time_up_to_the_cap(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, floor_per_s=4.0, cap=10.0)
    assert [budget.spend() for _ in range(11)] == [True] * 10 + [False]
    assert budget.denied == 1
    clock.now += 0.5  # two retries' worth
    assert [budget.spend() for _ in range(3)] == [True, True, False]
    clock.now += 3600.0  # an idle hour refills to the cap, not beyond
    assert sum(budget.spend() for _ in range(20)) == 10
    assert budget.denied == 1 + 1 + 10


@given(attempt=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_backoff_is_bounded_and_jittered_within_half(attempt: int, seed: int) -> None:
    base_s, cap_s = 0.005, 0.2
    nominal = min(cap_s, base_s * 2 ** (attempt - 1))
    delay = backoff_s(attempt, random.Random(seed), base_s, cap_s)
    assert 0.5 * nominal <= delay <= 1.5 * nominal
    assert delay <= 1.5 * cap_s


def test_backoff_grows_exponentially_until_the_cap_and_jitter_spreads_it() -> None:
    rng = random.Random(7)
    samples = {attempt: [backoff_s(attempt, rng) for _ in range(2000)] for attempt in range(1, 9)}
    medians = {attempt: statistics.median(values) for attempt, values in samples.items()}
    for attempt in range(1, 6):  # 5, 10, 20, 40, 80, 160 ms nominal
        assert medians[attempt + 1] / medians[attempt] == pytest.approx(2.0, rel=0.1)
    assert medians[7] == pytest.approx(0.2, rel=0.05) and medians[8] == pytest.approx(0.2, rel=0.05)  # capped
    for attempt, values in samples.items():
        nominal = min(0.2, 0.005 * 2 ** (attempt - 1))
        # the jitter covers the whole +-50% band: retries that failed together spread out
        assert min(values) < 0.55 * nominal and max(values) > 1.45 * nominal
        assert len(set(values)) == len(values)


# ------------------------------------------------------------------ retries with real processes


def retry_counters(router: ServiceProcess) -> tuple[int, int]:
    """(batches retried, retries the budget refused) from the router's /metrics."""
    samples = scrape(router.ready["metrics_address"])
    return (
        int(total(samples, "moe_serve_dispatch_retries_total")),
        int(total(samples, "moe_serve_dispatch_retries_denied_total")),
    )


@pytest.fixture(params=ROUTER_MODES)
def two_replicas(checkpoints, request: pytest.FixtureRequest) -> Iterator[Callable[[float], ProcessStack]]:
    """Starts a router (metrics on; its own process, or in the gateway's), workers "victim" (its
    registration living `victim_ttl_s` without a heartbeat) and "survivor" (30 s: it may be paused a
    while), each holding every expert, and a gateway; tiny FP32 model."""
    started: list[ProcessStack] = []

    def start(victim_ttl_s: float) -> ProcessStack:
        stack = start_process_stack(
            checkpoints(torch.float32),
            [
                ["--worker-id", "victim", "--registry-ttl", str(victim_ttl_s)],
                ["--worker-id", "survivor", "--registry-ttl", "30"],
            ],
            router_args=("--metrics-port", "0"),
            router_mode=request.param,
        )
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stack.stop()


def test_replica_killed_under_load_is_retried_on_the_other_and_no_request_fails(
    two_replicas, checkpoints, reliability_record
) -> None:
    """The victim is paused a moment (batches pile up on it), then SIGKILLed: its batches, hedged on the
    survivor once overdue or failing with UNAVAILABLE, are delivered by the survivor; its registration
    expires; no client sees an error."""
    stack = two_replicas(victim_ttl_s=2.0)
    victim = next(w for w in stack.workers if w.ready["worker_id"] == "victim")
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    clients, tokens = 3, 24
    with client_load(stack, blocks, clients, tokens) as outcome:
        wait_until(lambda: outcome.answered >= 20, 30, "load running")
        with paused(victim):
            time.sleep(0.5)
            victim.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        victim.process.wait(10)
        expired_s = wait_until(
            lambda: "victim" not in registered_worker_ids(stack.router.address), 10, "victim's registration expired"
        )
        answered = outcome.answered
        wait_until(lambda: outcome.answered >= answered + 30, 30, "serving on the survivor")
    retried, denied = retry_counters(stack.router)
    hedged = int(total(scrape(stack.router.ready["metrics_address"]), "moe_serve_dispatch_hedges_total"))
    elapsed_s = time.monotonic() - killed_at

    assert outcome.failures == []
    assert outcome.wrong == 0
    assert retried + hedged >= 1  # the batches stuck on the victim were hedged or retried, not lost
    assert denied == 0
    budget = RetryBudget()  # hedges and retries spend from the same budget (the pause came 0.5 s before the kill)
    assert retried + hedged <= budget.cap + budget.floor_per_s * (elapsed_s + 0.5)
    recover_s = min(t for t in outcome.answered_at if t > killed_at) - killed_at
    reliability_record(
        stack.scenario("worker-killed"),
        title=stack.titled("One of two replicas killed under load"),
        load=f"{clients} clients back to back, T={tokens}, both MoE layers; 2 workers, each every expert",
        faults="SIGKILL to one worker after a 0.5 s pause (batches in flight on it)",
        succeeded=outcome.answered,
        failed=len(outcome.failures),
        wrong_answers=outcome.wrong,
        recover_s=recover_s,
        batches_retried=retried,
        batches_hedged=hedged,
        retries_denied=denied,
        registration_expired_after_s=expired_s,
        slowest_request_s=outcome.slowest_s,
    )


@pytest.mark.parametrize("two_replicas", ["embedded"], indirect=True)  # the budget is the same code in both modes
def test_retry_budget_caps_retries_when_a_replica_fails_hundreds_of_batches(
    two_replicas, checkpoints, reliability_record
) -> None:
    """Both replicas paused while 400 requests are routed (each request's rows go to one of them, about
    half to each); the victim is then killed: all its batches fail at once. The budget (50 retries, refilled 5/s)
    lets that many go to the survivor; every other request fails at once with UNAVAILABLE. (Both
    registrations outlive the pause, however slow routing the burst is on a loaded machine.)"""
    stack = two_replicas(victim_ttl_s=30.0)
    victim, survivor = sorted(stack.workers, key=lambda w: w.ready["worker_id"] != "victim")
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    burst, tokens = 400, 4
    hidden = [torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(burst)]
    rows_before = router_rows_sent(stack.router.address)
    channel, stub = kserve_stub(stack.address)
    with channel:
        with paused(survivor):
            with paused(victim):
                calls = [stub.ModelInfer.future(infer_request(stack.model, h), timeout=60) for h in hidden]
                done_at: dict[int, float] = {}
                for index, call in enumerate(calls):
                    call.add_done_callback(lambda _, index=index: done_at.setdefault(index, time.monotonic()))
                # every request routed (k=2 rows per token) and its batches handed to the streams
                wait_until(
                    lambda: router_rows_sent(stack.router.address) - rows_before == burst * tokens * 2,
                    30,
                    "the burst routed",
                )
                time.sleep(0.3)
                victim.process.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
            victim.process.wait(10)
        outcomes = [(call.exception(), call) for call in calls]
        wait_until(lambda: len(done_at) == burst, 10, "every answer's time recorded")
    retried, denied = retry_counters(stack.router)
    elapsed_s = time.monotonic() - killed_at

    failed = [error for error, _ in outcomes if error is not None]
    answered = [(h, call) for h, (error, call) in zip(hidden, outcomes, strict=True) if error is None]
    budget = RetryBudget()
    # at most the budget's worth retried, however many batches failed; each refusal failed one request
    assert 1 <= retried <= budget.cap + budget.floor_per_s * elapsed_s
    assert denied == len(failed) >= budget.cap  # the failure was well over the budget: the excess failed
    assert {error.code() for error in failed} == {grpc.StatusCode.UNAVAILABLE}
    assert all("failed on worker victim after 1 attempt(s)" in error.details() for error in failed)
    wrong = sum(not exact(response_tensors(call.result())["output"], block, h) for h, call in answered)
    assert wrong == 0
    failed_within_s = max(done_at[i] - killed_at for i, (error, _) in enumerate(outcomes) if error is not None)
    assert failed_within_s < 5.0  # ... at once, not at their 60 s deadline
    assert len(answered) + len(failed) == burst
    reliability_record(
        stack.scenario("retry-budget"),
        title=stack.titled("Replica killed with hundreds of batches on it"),
        load=f"{burst} concurrent requests (T={tokens}) routed over 2 paused replicas",
        faults="SIGKILL to one replica with ~half the batches on it",
        succeeded=len(answered),
        failed=len(failed),
        wrong_answers=wrong,
        recover_s=None,
        expected_failures="UNAVAILABLE once the retry budget is spent (by design: no retry storm)",
        batches_retried=retried,
        retries_denied=denied,
        refused_requests_answered_within_s=failed_within_s,
        retry_budget=f"{budget.cap:g} + {budget.floor_per_s:g}/s + {budget.ratio:g} per first attempt",
    )


# ------------------------------------------------------------------ duplicate deliveries


class DuplicatingRelay(moe_grpc.ExpertWorkerServicer, moe_grpc.DeliveryServiceServicer):
    """A registered 'worker' in front of a real, unregistered one: it has the real worker deliver to
    itself, then delivers to the gateway the first half of the rows, the same slots again with
    garbage rows, the second half, and finally the whole batch again (the request has finished)."""

    def __init__(self, worker_address: str) -> None:
        self.worker_channel = internal_channel(worker_address)
        self.worker = moe_grpc.ExpertWorkerStub(self.worker_channel)
        self.address = ""
        self.captured: dict[str, moe_pb2.Delivery] = {}
        # the gateway's acks, as (status code, rows accepted): of the rows delivered once (first
        # half, second half), of the duplicate while the request waits, of the copy after it finished
        self.acks: dict[str, list[tuple[str, int]]] = {"once": [], "duplicate": [], "late": []}
        self.lock = threading.Lock()

    def ComputeStream(self, requests: Iterator[moe_pb2.ComputeRequest], context) -> Iterator[moe_pb2.ComputeResult]:
        for request in requests:
            yield self.relay(request)

    def DeliveryStream(self, deliveries: Iterator[moe_pb2.Delivery], context) -> Iterator[moe_pb2.DeliveryAck]:
        for delivery in deliveries:
            with self.lock:
                self.captured[delivery.request_id] = delivery
            yield moe_pb2.DeliveryAck(call_id=delivery.call_id, rows_accepted=delivery.positions.shape[0])

    def relay(self, request: moe_pb2.ComputeRequest) -> moe_pb2.ComputeResult:
        forwarded = moe_pb2.ComputeRequest()
        forwarded.CopyFrom(request)
        forwarded.delivery_address, forwarded.call_id = self.address, 1
        result = next(self.worker.ComputeStream(iter([forwarded]), timeout=30))
        assert not result.HasField("failure"), result.failure
        with self.lock:
            delivery = self.captured.pop(request.request_id)
        positions = codec.from_proto(delivery.positions, "positions")
        rows = codec.from_proto(delivery.rows, "rows")
        half = positions.shape[0] // 2
        with internal_channel(request.delivery_address) as channel:
            accepted = self.deliver_with_duplicates(
                moe_grpc.DeliveryServiceStub(channel), request.request_id, positions, rows, half
            )
        return moe_pb2.ComputeResult(call_id=request.call_id, rows_delivered=accepted)

    def deliver_with_duplicates(
        self,
        gateway: moe_grpc.DeliveryServiceStub,
        request_id: str,
        positions: torch.Tensor,
        rows: torch.Tensor,
        half: int,
    ) -> int:
        def deliver(slots: torch.Tensor, values: torch.Tensor) -> tuple[str, int]:
            message = moe_pb2.Delivery(
                request_id=request_id,
                positions=codec.to_proto(slots),
                rows=codec.to_proto(values),
                worker_id="relay",
                call_id=1,
            )
            ack = next(gateway.DeliveryStream(iter([message]), timeout=10))
            status = status_code_from_number(ack.failure.code) if ack.HasField("failure") else grpc.StatusCode.OK
            return status.name, ack.rows_accepted

        first = deliver(positions[:half], rows[:half])
        duplicate = deliver(positions[:half], torch.full_like(rows[:half], 1e4))
        second = deliver(positions[half:], rows[half:])
        late = deliver(positions, torch.full_like(rows, -1e4))
        with self.lock:
            self.acks["once"] += [first, second]
            self.acks["duplicate"].append(duplicate)
            self.acks["late"].append(late)
        return first[1] + second[1]


@pytest.fixture
def relay_stack(checkpoints) -> Iterator[tuple[ProcessStack, DuplicatingRelay]]:
    checkpoint: Path = checkpoints(torch.float32)
    router = start_service_process("router", ["router", "--checkpoint", str(checkpoint), "--port", "0"])
    worker = start_service_process("worker", ["worker", "--checkpoint", str(checkpoint), "--port", "0"])
    relay = DuplicatingRelay(worker.address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    moe_grpc.add_ExpertWorkerServicer_to_server(relay, server)
    moe_grpc.add_DeliveryServiceServicer_to_server(relay, server)
    relay.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    gateway = None
    try:
        experts = [moe_pb2.ExpertKey(layer=layer, expert=expert) for layer in (0, 1) for expert in range(8)]
        relay_info = moe_pb2.WorkerInfo(
            worker_id="relay",
            address=relay.address,
            experts=experts,
            weights_version=Checkpoint(checkpoint).fingerprint(),
            compute_datatype="FP32",
        )
        with internal_channel(router.address) as channel:
            moe_grpc.WorkerRegistryStub(channel).Register(
                moe_pb2.RegisterRequest(worker=relay_info, ttl_s=0), timeout=10
            )
        wait_until_ready(router.address, internal_credentials())
        gateway = start_service_process("gateway", ["gateway", "--router-address", router.address, "--port", "0"])
        yield ProcessStack(checkpoint, router, [worker], gateway), relay
    finally:
        for process in (gateway, worker, router):
            if process is not None:
                process.stop()
        server.stop(0)
        relay.worker_channel.close()


def test_duplicate_deliveries_are_ignored_and_the_gateway_keeps_serving(relay_stack, checkpoints) -> None:
    stack, relay = relay_stack
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    channel, stub = kserve_stub(stack.address)
    with channel:
        for seed in range(12):
            layer, tokens = seed % 2, 1 + 5 * seed
            hidden = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))
            reply = stub.ModelInfer(infer_request(stack.model, hidden, layer=layer), timeout=30)
            torch.testing.assert_close(
                response_tensors(reply)["output"], reference_forward(blocks[layer], hidden)[0], rtol=1e-5, atol=1e-5
            )
    # every request had its first half delivered again, with garbage, while it waited for the second
    # half: not one of those rows was taken; nor one of the whole batch delivered again at the end
    wait_until(lambda: len(relay.acks["late"]) == 12, 10, "the relay's last deliveries")
    assert relay.acks["duplicate"] == [("OK", 0)] * 12
    # (the gateway may not have closed the request yet when the late copy arrives: then it takes 0 rows)
    assert set(relay.acks["late"]) <= {("NOT_FOUND", 0), ("OK", 0)}
    assert {status for status, _ in relay.acks["once"]} == {"OK"}
    assert sum(rows for _, rows in relay.acks["once"]) == 2 * sum(1 + 5 * seed for seed in range(12))
    stats = gateway_stats(stack.delivery_address)
    assert (stats.inflight_requests, stats.pending_dispatches) == (0, 0)
