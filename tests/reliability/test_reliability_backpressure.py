"""Back-pressure: a burst of ten times the admission bound is answered at once, the excess with
RESOURCE_EXHAUSTED within 10 ms each (measured by the gateway itself: its request-duration
histogram), the admitted requests exactly; nothing queues, and the gateway's memory stays flat.

The worker is paused (SIGSTOP) while each burst arrives, so the admitted requests stay in flight
for the whole burst and the split is exact: the bound's worth admitted, every other one refused.
"""

from __future__ import annotations

import functools

import grpc
import torch

from moe_serve.bench.measure import rss_mib
from moe_serve.cluster.processes import start_service_process
from tests.helpers import (
    gateway_stats,
    infer_request,
    kserve_stub,
    paused,
    reference_blocks,
    reference_forward,
    response_tensors,
    wait_until,
)
from tests.integration.test_telemetry import scrape

TOKENS = 256  # per request: 64 KiB of FP32 hidden states
CAPACITY = 4  # requests the admission bound holds
BURST = 10 * CAPACITY
BURSTS = 5
REJECT_WITHIN_S = 0.01
WARM_UP_BURSTS = 2


def bucket_counts(samples: dict, status_code: str) -> dict[float, float]:
    """Cumulative count per bucket bound (seconds) of the gateway's request-duration histogram."""
    return {
        float(labels["le"]): value
        for labels, value in samples["moe_serve_request_duration_seconds_bucket"]
        if labels.get("status_code") == status_code
    }


def refusals_done(futures: list[grpc.Future]) -> bool:
    return sum(future.done() for future in futures) == BURST - CAPACITY


def test_burst_of_ten_times_capacity_is_refused_at_once_and_admitted_work_is_exact(
    slow_stack, slow_checkpoint, reliability_record
) -> None:
    gateway = start_service_process(
        "gateway-bounded",
        [
            "gateway",
            "--router-address",
            slow_stack.router.address,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--max-inflight-tokens",
            str(CAPACITY * TOKENS),
        ],
    )
    try:
        block = reference_blocks(slow_checkpoint, torch.float32)[0]
        model = gateway.ready["model"]
        delivery = gateway.ready["delivery_address"]
        rss: list[float] = []
        admitted = refused = wrong = 0
        channel, stub = kserve_stub(gateway.address)
        with channel:
            for burst in range(BURSTS):
                hidden = [
                    torch.randn(TOKENS, 64, generator=torch.Generator().manual_seed(burst * BURST + i))
                    for i in range(BURST)
                ]
                with paused(slow_stack.workers[0]):
                    futures = [stub.ModelInfer.future(infer_request(model, h), timeout=60) for h in hidden]
                    # the refusals come back while the admitted requests are still in flight
                    wait_until(functools.partial(refusals_done, futures), 30, "the excess refused")
                    assert gateway_stats(delivery).inflight_requests == CAPACITY
                for tensor, future in zip(hidden, futures, strict=True):
                    if future.exception() is not None:
                        assert future.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        assert f"max_inflight_tokens={CAPACITY * TOKENS}" in future.details()
                        refused += 1
                        continue
                    admitted += 1
                    output = response_tensors(future.result())["output"]
                    wrong += not torch.allclose(output, reference_forward(block, tensor)[0], rtol=1e-5, atol=1e-5)
                rss.append(rss_mib(gateway.process.pid))
        stats = gateway_stats(delivery)
        samples = scrape(gateway.ready["metrics_address"])
    finally:
        gateway.stop()

    assert (admitted, refused, wrong) == (BURSTS * CAPACITY, BURSTS * (BURST - CAPACITY), 0)
    assert stats.rejected_requests == refused and stats.inflight_requests == stats.inflight_tokens == 0
    rejections = bucket_counts(samples, "RESOURCE_EXHAUSTED")
    # every refusal took at most 10 ms inside the gateway, from receiving the request to answering
    assert rejections[REJECT_WITHIN_S] == rejections[float("inf")] == refused
    slowest_bound_ms = 1000 * min(bound for bound, count in rejections.items() if count == refused)
    # memory: flat once the allocator has seen two bursts (each carries 2.3 MiB of refused payload)
    growth = (rss[-1] - rss[WARM_UP_BURSTS - 1]) / rss[WARM_UP_BURSTS - 1]
    assert growth <= 0.05, rss
    reliability_record(
        "back-pressure",
        title="Burst of 10x the admission bound",
        load=f"{BURSTS} bursts of {BURST} concurrent T={TOKENS} requests; bound {CAPACITY} requests",
        faults="worker paused while each burst arrives (admitted work held in flight)",
        succeeded=admitted,
        failed=refused,
        wrong_answers=wrong,
        recover_s=0.0,
        expected_failures="RESOURCE_EXHAUSTED for the excess (by design)",
        rejection_time_ms_at_most=slowest_bound_ms,
        gateway_rss_mib_after_warm_up=round(rss[WARM_UP_BURSTS - 1], 1),
        gateway_rss_mib_last=round(rss[-1], 1),
    )
