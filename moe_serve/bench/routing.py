"""Benchmark sections for routing: a concurrency sweep with batching off and on, and drop rates
under capacity on a skewed router. Extra gateways (own policy each) share the stack's router."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any

import grpc
import torch

from moe_serve.bench.measure import Latency
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.grpc_utils import channel_options
from moe_serve.launcher import ServiceProcess, Stack, start_service_process
from moe_serve.protos import grpc_predict_v2_pb2_grpc as kserve_grpc


def extra_gateway(stack: Stack, name: str, *flags: str) -> ServiceProcess:
    return start_service_process(
        name,
        [
            "gateway",
            "--router-address",
            stack.router.address,
            "--port",
            "0",
            "--model-name",
            stack.model_name,
            "--log-level",
            "WARNING",
            *flags,
        ],
    )


def run_clients(address: str, requests: list[Any], clients: int, per_client: int) -> dict[str, Any]:
    """`clients` threads each send `per_client` requests back to back; throughput and latency over all."""
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def client(index: int) -> None:
        nonlocal tokens
        with grpc.insecure_channel(address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(requests[index % len(requests)], timeout=60)  # connect and warm up
            barrier.wait()
            for i in range(per_client):
                request = requests[(index + i) % len(requests)]
                started = time.perf_counter()
                stub.ModelInfer(request, timeout=60)
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
                    tokens += int(request.inputs[0].shape[0])

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "tokens_per_s": tokens / elapsed, "latency_ms": asdict(Latency.of(latencies))}


def concurrency_sweep(
    stack: Stack,
    make_request: Any,
    hidden_size: int,
    tokens: int = 64,
    client_counts: tuple[int, ...] = (1, 4, 16),
    requests_per_client: int = 12,
    batch_window_ms: float = 2.0,
) -> dict[str, list[dict[str, Any]]]:
    """Throughput and latency at T=`tokens` for each client count, batching off and on."""
    generator = torch.Generator().manual_seed(1)
    requests = [
        make_request(stack.model_name, torch.randn(tokens, hidden_size, generator=generator)) for _ in range(16)
    ]
    results: dict[str, list[dict[str, Any]]] = {"batching_off": [], "batching_on": []}
    batched = extra_gateway(stack, "gateway-batched", "--batch-window-ms", str(batch_window_ms))
    try:
        for clients in client_counts:
            results["batching_off"].append(run_clients(stack.address, requests, clients, requests_per_client))
            results["batching_on"].append(run_clients(batched.address, requests, clients, requests_per_client))
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
