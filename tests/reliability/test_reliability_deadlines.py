"""Deadlines: the client's deadline travels gateway -> router -> worker as remaining time; work for an
expired request is abandoned at the next hop (not computed, not delivered); the client gets
DEADLINE_EXCEEDED; nothing of it reaches a later request, which is exact.

One worker holds every expert and computes one segment at a time (`--compute-threads 1`), so a
large request on the wide-expert checkpoint keeps it busy for seconds: small requests sent then
wait behind it and expire there, deterministically.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import torch

from tests.helpers import (
    BLOCKER_TOKENS,
    ProcessStack,
    gateway_stats,
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
    router_rows_sent,
    start_blocker,
    wait_until,
    worker_load,
)
from tests.integration.test_telemetry import scrape, total

SHORT_TOKENS = 8
# client deadlines of the requests that expire behind the long one: from "gone before it is
# routed" to "reaches the worker and waits there"
SHORT_DEADLINES_S = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4)
REACHES_WORKER_S = 0.2  # a deadline at least this long always outlives the trip to the worker


def hidden_states(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))


def test_expired_work_is_abandoned_at_the_next_hop_and_the_next_request_is_exact(
    slow_stack: ProcessStack, slow_checkpoint: Path, reliability_record
) -> None:
    stack = slow_stack
    block = reference_blocks(slow_checkpoint, torch.float32)[0]
    worker = stack.workers[0]
    channel, stub = kserve_stub(stack.address)
    with channel:
        warm = hidden_states(4, 0)
        result = response_tensors(stub.ModelInfer(infer_request(stack.model, warm), timeout=60))
        torch.testing.assert_close(result["output"], reference_forward(block, warm)[0], rtol=1e-5, atol=1e-5)
        before = scrape(worker.ready["metrics_address"])
        rows_before = router_rows_sent(stack.router.address)

        long, long_future = start_blocker(stub, stack.model, worker.address)
        shorts = {
            (deadline, seed): stub.ModelInfer.future(
                infer_request(stack.model, hidden_states(SHORT_TOKENS, seed)), timeout=deadline
            )
            for seed, deadline in enumerate(SHORT_DEADLINES_S * 2, start=100)
        }
        for future in shorts.values():
            assert future.exception() is not None and future.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        expired_at = time.monotonic()
        assert not long_future.done(), "the long request finished early: the short ones did not wait behind it"

        # a request sent now queues behind the long one and is exact: no stale rows reach it
        after = hidden_states(SHORT_TOKENS, 100)  # the very input of an expired request
        answer = response_tensors(stub.ModelInfer(infer_request(stack.model, after), timeout=60))
        recovered_s = time.monotonic() - expired_at
        expected_after, _, after_ids = reference_forward(block, after)
        torch.testing.assert_close(answer["output"], expected_after, rtol=1e-5, atol=1e-5)
        long_result = response_tensors(long_future.result())
        torch.testing.assert_close(long_result["output"], reference_forward(block, long)[0], rtol=1e-5, atol=1e-5)

    wait_until(lambda: worker_load(worker.address).inflight_rows == 0, 30, "worker idle")
    # every short request the router sent on (one batch of 2 x SHORT_TOKENS rows each, one worker)
    # was abandoned by the worker: none computed, none delivered
    short_rows = router_rows_sent(stack.router.address) - rows_before - 2 * BLOCKER_TOKENS - 2 * SHORT_TOKENS
    assert short_rows % (2 * SHORT_TOKENS) == 0
    sent_on = short_rows // (2 * SHORT_TOKENS)
    assert sent_on >= 2 * sum(1 for d in SHORT_DEADLINES_S if d >= REACHES_WORKER_S)
    metrics = scrape(worker.ready["metrics_address"])
    abandoned = total(metrics, "moe_serve_worker_abandoned_total") - total(before, "moe_serve_worker_abandoned_total")
    assert abandoned == sent_on
    computed = total(metrics, "moe_serve_expert_compute_duration_seconds_count") - total(
        before, "moe_serve_expert_compute_duration_seconds_count"
    )
    assert computed == 8 + len(torch.unique(after_ids))  # the long request's 8 experts, then the last one's

    stats = gateway_stats(stack.delivery_address)
    assert (stats.inflight_requests, stats.inflight_tokens, stats.pending_dispatches) == (0, 0, 0)
    reliability_record(
        "deadlines",
        title="Client deadlines expire mid-request",
        load=f"one T={BLOCKER_TOKENS} request keeping the only worker busy (~2 s)",
        faults=f"{len(shorts)} requests with deadlines of 1-400 ms queued behind it",
        succeeded=3,
        failed=len(shorts),
        wrong_answers=0,
        recover_s=recovered_s,
        expected_failures="DEADLINE_EXCEEDED (by design)",
        abandoned_at_worker=int(abandoned),
        abandoned_before_reaching_worker=len(shorts) - sent_on,
        expired_batches_computed=0,
    )
