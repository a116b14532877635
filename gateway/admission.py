"""Admission control: a hard bound on tokens in flight; work beyond it is refused at once.

Refusing (RESOURCE_EXHAUSTED) instead of queueing keeps latency bounded for admitted work and
tells clients to back off; nothing is queued without limit anywhere in the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from moe_serve.runtime.errors import InvalidInput, Overloaded


class AdmissionController:
    """Counts tokens of admitted, unfinished requests (single event loop: no lock needed)."""

    def __init__(self, max_inflight_tokens: int, max_request_tokens: int) -> None:
        self.max_inflight_tokens = max_inflight_tokens
        self.max_request_tokens = max_request_tokens
        self.inflight_tokens = 0
        self.inflight_requests = 0
        self.admitted = 0
        # requests refused with RESOURCE_EXHAUSTED by any bound, this one or the router's: counted
        # by the data plane, where every refusal passes
        self.rejected = 0
        # set by the data plane when cross-request batching is on: (requests waiting in open
        # batches, batches running), read by GatewayAdmin.GetStats for leak checks
        self.batch_occupancy: Callable[[], tuple[int, int]] = lambda: (0, 0)

    @contextmanager
    def admit(self, num_tokens: int) -> Iterator[None]:
        """Hold `num_tokens` of the budget for the duration of the block, or raise Overloaded."""
        if num_tokens > self.max_request_tokens:
            raise InvalidInput(
                f"request has {num_tokens} tokens, more than max_request_tokens="
                f"{self.max_request_tokens}; split it into smaller requests"
            )
        if self.inflight_tokens + num_tokens > self.max_inflight_tokens:
            raise Overloaded(
                f"gateway at capacity: {self.inflight_tokens} tokens in flight + {num_tokens} "
                f"requested exceeds max_inflight_tokens={self.max_inflight_tokens}; retry with backoff",
                reason="inflight_tokens",
            )
        self.inflight_tokens += num_tokens
        self.inflight_requests += 1
        self.admitted += 1
        try:
            yield
        finally:
            self.inflight_tokens -= num_tokens
            self.inflight_requests -= 1
