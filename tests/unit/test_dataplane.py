"""The gateway's data plane in one process, no server and no network: admission, cross-request
batching, pipelined chunks, deadlines, cancellation and draining around a router that gates with the
router's own planner and computes with the workers' own expert store, checked against transformers.

The router here stands where gateway/routing.py's routers stand (the `Router` protocol): it returns
the plan and hands each expert's rows to the pending request on a later turn of the event loop, as a
worker's answer arrives, or holds them while `held` is set, as a busy worker would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from opentelemetry import trace

from expert_service.experts import ExpertStore
from gateway.admission import AdmissionController
from gateway.capacity_policy import CapacityPolicy
from gateway.converters import OUTPUT_NAME, InferenceRequest
from gateway.dataplane import DataPlane
from gateway.deliveries import PendingRequests
from gateway.live_state import LoadWindow
from gateway.model import ServedModel
from gateway.routing import Plan
from gateway.stats import ExpertCounters
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.placement import ExpertKey
from moe_serve.layer.dispatch import token_indices
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime.errors import DeadlineExceeded, InvalidInput, Overloaded, ServiceUnavailable
from router_service.planner import RoutingPlanner
from tests.helpers import reference_blocks, reference_forward, save_tiny_mixtral

HIDDEN = 64  # tests.helpers.TINY_MIXTRAL's hidden_size


class InProcessRouter:
    """Gates with the router's planner and computes with the workers' expert store, in this process."""

    def __init__(self, directory: Path, pending: PendingRequests) -> None:
        checkpoint = Checkpoint(directory)
        self.spec = checkpoint.spec
        self.planner = RoutingPlanner(checkpoint, torch.float32)
        keys = [ExpertKey(layer, e) for layer in self.spec.moe_layers for e in range(self.spec.num_placed_experts)]
        self.store = ExpertStore(checkpoint, keys, torch.float32, torch.device("cpu"))
        self.pending = pending
        self.batches: list[int] = []  # tokens of each routed batch, in order
        self.held = asyncio.Event()  # set: rows wait, as on a busy worker, until it is cleared
        self._released = asyncio.Event()
        self._released.set()
        self._deliveries: set[asyncio.Task[None]] = set()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def route(self, request: moe_pb2.RouteRequest, hidden: torch.Tensor, timeout: float) -> Plan:
        self.batches.append(hidden.shape[0])
        decision = self.planner.decide(hidden, request.layer, request.expert_capacity, request.overflow or "drop")
        task = asyncio.create_task(self._deliver(request.request_id, request.layer, hidden, decision))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        return Plan.of_decision(decision, self.spec.num_experts, request.return_router_logits)

    async def _deliver(self, batch_id: str, layer: int, hidden: torch.Tensor, decision) -> None:
        await self._released.wait()
        for expert in decision.groups.active_experts():
            positions = decision.groups.segment(expert)
            rows = hidden[token_indices(positions, decision.slots_per_token)]
            self.pending.deliver(batch_id, positions, self.store.compute(ExpertKey(layer, expert), rows))
            await asyncio.sleep(0)  # one worker's answer per loop turn, as from the wire


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("dataplane") / "tiny-mixtral")


@pytest.fixture(scope="module")
def blocks(checkpoint: Path) -> list[torch.nn.Module]:
    return reference_blocks(checkpoint, torch.float32)


class Harness:
    def __init__(self, checkpoint: Path, **options) -> None:
        self.pending = PendingRequests()
        self.router = InProcessRouter(checkpoint, self.pending)
        spec = self.router.spec
        model = ServedModel(
            name="tiny",
            family=spec.routing.family,
            hidden_size=spec.hidden_size,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            moe_layers=tuple(spec.moe_layers),
            num_layers=spec.num_layers,
            compute_dtype=torch.float32,
        )
        self.admission = AdmissionController(options.pop("max_inflight_tokens", 4096), 2048)

        async def model_info() -> moe_pb2.ModelInfo:
            return moe_pb2.ModelInfo(ready=True)

        self.plane = DataPlane(
            model,
            self.router,
            model_info,
            self.admission,
            self.pending,
            delivery_address="in-process",
            policy=CapacityPolicy(),  # dropless: Mixtral's own routing
            counters=ExpertCounters(model.moe_layers, spec.num_placed_experts),
            window=LoadWindow(spec.num_experts),
            tracer=trace.get_tracer("tests.dataplane"),
            wire=lambda hop, direction, size: None,
            **options,
        )

    async def infer(self, hidden: torch.Tensor, layer: int = 0, timeout_s: float = 10.0, outputs=(OUTPUT_NAME,)):
        request = InferenceRequest(
            request_id="r",
            hidden_states=hidden,
            input_shape=tuple(hidden.shape),
            layer=layer,
            requested_outputs=outputs,
        )
        return (await self.plane.infer(request, timeout_s)).tensors

    def settled(self) -> bool:
        """Nothing of any request left behind: admission budget, pending batches, open batches."""
        return (
            self.admission.inflight_tokens == 0
            and self.admission.inflight_requests == 0
            and len(self.pending) == 0
            and self.admission.batch_occupancy() == (0, 0)
        )


def tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(seed))


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_request_equals_the_transformers_block_with_its_gating_outputs(checkpoint, blocks) -> None:
    hidden = tokens(24, seed=1)

    async def scenario():
        plane = Harness(checkpoint)
        out = await plane.infer(hidden, layer=1, outputs=(OUTPUT_NAME, "router_logits", "expert_ids"))
        return out, plane.settled()

    out, settled = run(scenario())
    expected, logits, ids = reference_forward(blocks[1], hidden)
    torch.testing.assert_close(out[OUTPUT_NAME], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["router_logits"], logits)
    assert torch.equal(out["expert_ids"].long().sort(dim=1).values, ids.long().sort(dim=1).values)
    assert settled


def test_concurrent_requests_share_one_batch_and_each_gets_its_own_exact_rows(checkpoint, blocks) -> None:
    inputs = [tokens(n, seed=10 + n) for n in (3, 1, 7)]

    async def scenario():
        plane = Harness(checkpoint, batch_window_s=0.05, max_batch_tokens=64)
        outs = await asyncio.gather(*(plane.infer(h) for h in inputs))
        return outs, plane.router.batches, plane.settled()

    outs, batches, settled = run(scenario())
    assert batches == [11], f"three requests inside one window must be routed as one batch, got {batches}"
    for hidden, out in zip(inputs, outs, strict=True):
        torch.testing.assert_close(out[OUTPUT_NAME], reference_forward(blocks[0], hidden)[0], rtol=1e-5, atol=1e-6)
    assert settled


def test_pipelined_chunks_are_routed_apart_and_joined_in_order(checkpoint, blocks) -> None:
    hidden = tokens(40, seed=2)

    async def scenario():
        plane = Harness(checkpoint, pipeline_chunk_tokens=16)
        return await plane.infer(hidden), plane.router.batches

    out, batches = run(scenario())
    assert batches == [14, 13, 13]  # near-equal chunks, never a short remainder
    torch.testing.assert_close(out[OUTPUT_NAME], reference_forward(blocks[0], hidden)[0], rtol=1e-5, atol=1e-6)


def test_admission_refuses_beyond_the_token_bound_at_once_and_frees_the_budget(checkpoint, blocks) -> None:
    async def scenario():
        plane = Harness(checkpoint, max_inflight_tokens=16)
        plane.router.hold()
        first = asyncio.create_task(plane.infer(tokens(12, seed=3)))
        while plane.admission.inflight_tokens == 0:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="max_inflight_tokens=16"):
            await plane.infer(tokens(8, seed=4))
        with pytest.raises(InvalidInput, match="max_request_tokens=2048"):
            await plane.infer(tokens(2049, seed=5))
        plane.router.release()
        await first
        refused = plane.admission.rejected
        after = await plane.infer(tokens(16, seed=6))  # the whole budget, free again
        return refused, after, plane.settled()

    refused, after, settled = run(scenario())
    assert refused == 1
    torch.testing.assert_close(after[OUTPUT_NAME], reference_forward(blocks[0], tokens(16, seed=6))[0])
    assert settled


def test_a_deadline_that_passes_while_rows_are_out_names_what_arrived_and_leaves_nothing(checkpoint) -> None:
    async def scenario():
        plane = Harness(checkpoint)
        plane.router.hold()
        with pytest.raises(DeadlineExceeded, match=r"deadline passed with 0 of \d+ expert rows delivered"):
            await plane.infer(tokens(5, seed=7), timeout_s=0.05)
        plane.router.release()
        await asyncio.sleep(0.01)  # the late rows find no pending request and are dropped
        return plane.settled()

    assert run(scenario())


def test_a_cancelled_request_frees_its_budget_and_its_place_in_an_open_batch(checkpoint) -> None:
    async def scenario():
        plane = Harness(checkpoint, batch_window_s=5.0, max_batch_tokens=64)
        task = asyncio.create_task(plane.infer(tokens(4, seed=8)))
        while plane.admission.batch_occupancy() == (0, 0):
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return plane.router.batches, plane.settled()

    batches, settled = run(scenario())
    assert batches == []  # withdrawn before its batch left: nothing was routed
    assert settled


def test_a_draining_gateway_refuses_new_work_with_unavailable(checkpoint) -> None:
    async def scenario():
        plane = Harness(checkpoint)
        plane.plane.draining = True
        with pytest.raises(ServiceUnavailable, match="shutting down"):
            await plane.infer(tokens(2, seed=9))
        return plane.router.batches, plane.settled()

    assert run(scenario()) == ([], True)
