"""Cancellation: clients that cancel mid-request free their admission tokens, their place in a
cross-request batch and their pending dispatch at once; after 1,000 cancelled requests every
counter of GatewayAdmin.GetStats is back at zero, and serving is exact.

Every request is cancelled only once the gateway holds it (GetStats says so), so all 1,000
cancellations happen mid-flight: routed and waiting for expert rows (the worker is paused with
SIGSTOP meanwhile, so nothing completes), waiting in an open cross-request batch, or riding a
dispatched batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from moe_serve.cluster.processes import ServiceProcess, start_service_process
from tests.helpers import (
    gateway_stats,
    infer_request,
    kserve_stub,
    paused,
    reference_blocks,
    reference_forward,
    response_tensors,
    wait_until,
    worker_load,
)
from tests.integration.test_telemetry import scrape, total

LEAK_FIELDS = ("inflight_requests", "inflight_tokens", "pending_dispatches", "batched_requests", "running_batches")
PROMPT_S = 3.0  # cancelled requests must free their slots well within this (the batch window is 20 s)


def counters(gateway: ServiceProcess) -> dict[str, int]:
    stats = gateway_stats(gateway.ready["delivery_address"])
    return {name: getattr(stats, name) for name in (*LEAK_FIELDS, "dispatches")}


@pytest.fixture
def gateway_of(slow_stack) -> Iterator:
    started: list[ServiceProcess] = []

    def start(*flags: str) -> ServiceProcess:
        process = start_service_process(
            "gateway-cancel",
            ["gateway", "--router-address", slow_stack.router.address, "--port", "0", "--metrics-port", "0", *flags],
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def send(stub, model: str, count: int, tokens: int, seed: int) -> list[grpc.Future]:
    request = infer_request(model, torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed)))
    return [stub.ModelInfer.future(request, timeout=60) for _ in range(count)]


def cancel_all(futures: list[grpc.Future]) -> int:
    cancelled = sum(future.cancel() for future in futures)
    assert cancelled == len(futures), "a request finished before it was cancelled"
    return cancelled


def assert_exact_after(stub, model: str, block, tokens: int) -> None:
    for seed in (11, 12):
        hidden = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))
        result = response_tensors(stub.ModelInfer(infer_request(model, hidden), timeout=60))
        torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)


def test_cancelled_requests_free_admission_and_dispatches(
    slow_stack, slow_checkpoint, gateway_of, reliability_record
) -> None:
    """Batching off: 1,000 requests routed and waiting for rows, then all cancelled."""
    gateway = gateway_of()
    block = reference_blocks(slow_checkpoint, torch.float32)[0]
    worker = slow_stack.workers[0]
    channel, stub = kserve_stub(gateway.address)
    with channel:
        with paused(worker):
            futures = send(stub, gateway.ready["model"], 1000, 4, seed=2)
            wait_until(lambda: counters(gateway)["pending_dispatches"] == 1000, 60, "1,000 requests routed")
            cancelled = cancel_all(futures)
            freed_s = wait_until(lambda: not any(counters(gateway)[k] for k in LEAK_FIELDS), PROMPT_S, "slots freed")
        # the worker computes what it was sent and learns from the gateway that nobody waits for it
        wait_until(lambda: worker_load(worker.address).inflight_rows == 0, 60, "worker idle")
        assert_exact_after(stub, gateway.ready["model"], block, 16)
    assert {k: v for k, v in counters(gateway).items() if k in LEAK_FIELDS} == dict.fromkeys(LEAK_FIELDS, 0)
    metrics = scrape(gateway.ready["metrics_address"])
    assert total(metrics, "moe_serve_requests_total", status_code="CANCELLED") == cancelled
    assert total(metrics, "moe_serve_requests_total", status_code="OK") == 2
    reliability_record(
        "cancellation-batching-off",
        title="1,000 requests cancelled mid-flight (batching off)",
        load="1,000 concurrent requests (T=4) routed, waiting for rows",
        faults="worker paused (SIGSTOP); 1,000 client cancellations once the gateway had routed them",
        succeeded=2,
        failed=cancelled,
        wrong_answers=0,
        recover_s=freed_s,
        expected_failures="CANCELLED by the client (by design)",
        cancelled_at_gateway=int(total(metrics, "moe_serve_requests_total", status_code="CANCELLED")),
        leaked_slots=0,
    )


def test_cancelled_requests_leave_open_and_running_batches(
    slow_stack, slow_checkpoint, gateway_of, reliability_record
) -> None:
    """Batching on (20 s window, 4,096-token batches): 400 requests cancelled while their batch is
    still open, then 600 more while 512 of them ride a dispatched batch (the worker paused) and 88
    wait in the next one."""
    gateway = gateway_of("--batch-window-ms", "20000", "--max-batch-tokens", "4096")
    block = reference_blocks(slow_checkpoint, torch.float32)[0]
    model = gateway.ready["model"]
    channel, stub = kserve_stub(gateway.address)
    with channel:
        futures = send(stub, model, 400, 8, seed=3)
        wait_until(lambda: counters(gateway)["batched_requests"] == 400, 60, "400 requests in the open batch")
        cancelled = cancel_all(futures)
        freed_open_s = wait_until(lambda: not any(counters(gateway)[k] for k in LEAK_FIELDS), PROMPT_S, "batch freed")
        assert counters(gateway)["dispatches"] == 0  # the emptied batch was never dispatched

        with paused(slow_stack.workers[0]):
            futures = send(stub, model, 600, 8, seed=4)
            wait_until(
                lambda: counters(gateway)["running_batches"] == 1 and counters(gateway)["batched_requests"] == 88,
                60,
                "a full batch dispatched and the next one open",
            )
            cancelled += cancel_all(futures)
            freed_s = wait_until(
                lambda: counters(gateway)["inflight_requests"] == 0 and counters(gateway)["batched_requests"] == 0,
                PROMPT_S,
                "slots freed",
            )
        wait_until(lambda: not any(counters(gateway)[k] for k in LEAK_FIELDS), 60, "the dispatched batch finished")
        assert counters(gateway)["dispatches"] == 1
        assert_exact_after(stub, model, block, 4096)  # a full batch is dispatched without waiting for the window
    metrics = scrape(gateway.ready["metrics_address"])
    assert total(metrics, "moe_serve_requests_total", status_code="CANCELLED") == cancelled == 1000
    assert total(metrics, "moe_serve_requests_total", status_code="OK") == 2
    reliability_record(
        "cancellation-batching-on",
        title="1,000 requests cancelled mid-flight (batching on)",
        load="400 then 600 concurrent requests (T=8), 20 s batch window, 4,096-token batches",
        faults="1,000 client cancellations: in an open batch, and in a dispatched one (worker paused)",
        succeeded=2,
        failed=cancelled,
        wrong_answers=0,
        recover_s=max(freed_open_s, freed_s),
        expected_failures="CANCELLED by the client (by design)",
        cancelled_at_gateway=int(total(metrics, "moe_serve_requests_total", status_code="CANCELLED")),
        leaked_slots=0,
    )
