"""Benchmark sections for routing: a concurrency sweep with batching off and on, and drop rates
under capacity on a skewed router. Extra gateways (own policy each) share the stack's router."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import torch

from moe_serve.bench.measure import ConcurrentRun, run_concurrent
from moe_serve.cluster.launcher import Stack
from moe_serve.cluster.processes import ServiceProcess, start_service_process
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.runtime.grpc_utils import channel_options
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc


def extra_gateway(stack: Stack, name: str, *flags: str) -> ServiceProcess:
    return start_service_process(
        name,
        [
            "gateway",
            "--router-address",
            stack.router.address,
            "--port",
            "0",
            "--no-http",  # gRPC only: runs side by side never contend for the REST port
            "--model-name",
            stack.model_name,
            "--log-level",
            "WARNING",
            "--no-metrics",
            *flags,
        ],
    )


def run_clients(address: str, requests: list[Any], clients: int, per_client: int) -> ConcurrentRun:
    """`clients` threads, each on its own channel, send `per_client` requests back to back."""

    @contextmanager
    def open_client(index: int) -> Iterator[Callable[[int], int]]:
        with grpc.insecure_channel(address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)

            def call(i: int) -> int:
                request = requests[(index + i) % len(requests)]
                stub.ModelInfer(request, timeout=60)
                return int(request.inputs[0].shape[0])

            yield call

    return run_concurrent(open_client, clients, per_client)


def client_run(address: str, requests: list[Any], clients: int, per_client: int) -> dict[str, Any]:
    """Throughput and latency of `run_clients`, summarised."""
    return run_clients(address, requests, clients, per_client).summary(clients)


def concurrency_sweep(
    stack: Stack,
    make_request: Any,
    hidden_size: int,
    dtype: torch.dtype = torch.float32,
    tokens: int = 64,
    client_counts: tuple[int, ...] = (1, 4, 16),
    requests_per_client: int = 12,
    batch_window_ms: float = 2.0,
) -> dict[str, list[dict[str, Any]]]:
    """Throughput and latency at T=`tokens` for each client count, batching off and on."""
    generator = torch.Generator().manual_seed(1)
    requests = [
        make_request(stack.model_name, torch.randn(tokens, hidden_size, generator=generator).to(dtype))
        for _ in range(16)
    ]
    results: dict[str, list[dict[str, Any]]] = {"batching_off": [], "batching_on": []}
    batched = extra_gateway(stack, "gateway-batched", "--batch-window-ms", str(batch_window_ms))
    try:
        for clients in client_counts:
            results["batching_off"].append(client_run(stack.address, requests, clients, requests_per_client))
            results["batching_on"].append(client_run(batched.address, requests, clients, requests_per_client))
    finally:
        batched.stop()
    return results


def skewed_hidden_states(
    router_gate: torch.Tensor, tokens: int, top_k: int, hot_share: float = 0.3, seed: int = 2
) -> torch.Tensor:
    """Hidden states whose routing sends at least `hot_share` of all slots to expert 0.

    Adds the smallest multiple (in steps of 0.25) of expert 0's router direction that does it.
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, router_gate.shape[1], generator=generator)
    direction = router_gate[0].float() / router_gate[0].float().norm()
    scale = 0.0
    while True:
        hidden = base + scale * direction
        ids = torch.topk(hidden @ router_gate.float().t(), top_k, dim=-1).indices
        if float((ids == 0).float().mean()) >= hot_share or scale > 100:
            return hidden
        scale += 0.25


def drop_rates(
    stack: Stack,
    make_request: Any,
    router_gate: torch.Tensor,
    top_k: int,
    factors: tuple[float, ...] = (1.0, 1.25, 2.0),
    tokens: int = 256,
    requests: int = 8,
) -> list[dict[str, Any]]:
    """Share of slots dropped (rule drop) and rerouted (rule reroute) per capacity factor."""
    inputs = [skewed_hidden_states(router_gate, tokens, top_k, seed=seed) for seed in range(requests)]
    rows: list[dict[str, Any]] = []
    for factor in factors:
        row: dict[str, Any] = {"capacity_factor": factor}
        for rule in ("drop", "reroute"):
            gateway = extra_gateway(stack, f"gateway-{rule}", "--capacity-factor", str(factor), "--overflow", rule)
            try:
                with grpc.insecure_channel(gateway.address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as ch:
                    stub = kserve_grpc.GRPCInferenceServiceStub(ch)
                    counts = [stub.ModelInfer(make_request(stack.model_name, h), timeout=60).parameters for h in inputs]
            finally:
                gateway.stop()
            slots = tokens * requests * top_k
            row[f"{rule}_dropped_share"] = sum(c["dropped_slots"].int64_param for c in counts) / slots
            row[f"{rule}_rerouted_share"] = sum(c["rerouted_slots"].int64_param for c in counts) / slots
        rows.append(row)
    hot = torch.cat([torch.topk(h @ router_gate.float().t(), top_k, dim=-1).indices for h in inputs])
    for row in rows:
        row["hot_expert_share"] = float((hot == 0).float().mean())
    return rows
