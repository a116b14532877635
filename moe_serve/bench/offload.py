"""Benchmark section: expert offloading. Device budgets of 100%, 50% and 25% of each worker's experts,
with and without the router's prefetch hints, on a Zipf-skewed trace and on a uniform one.

A trace is a series of forward passes through two MoE layers (layer 0, then layer 1, one request
each, the pass's `sequence_id` on both), one client, T tokens per request (decode-sized batches,
where offloading matters: at E=8, k=2 a batch of 16 tokens already touches nearly every expert).
Zipf trace: each token leans towards an expert pair drawn from a Zipf law at layer 0 and towards a
fixed other pair at layer 1 (experts that follow each other, as in real models); uniform trace:
unsteered random hidden states.
Hit rates and bytes moved come from the workers' own accounting (before/after deltas).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import torch

from expert_service.actor import ExpertWorkerActor
from moe_serve.bench.measure import Latency
from moe_serve.bench.replication import zipf_preferences
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.launcher import Stack, launch_stack
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES, UpSettings
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.grpc_utils import channel_options
from moe_serve.runtime.security import open_channel
from moe_serve.worker_record import WorkerRecord
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc

COUNTERS = ("hits", "misses", "bytes_moved", "load_seconds", "evictions", "prefetched")


def trace(checkpoint: Checkpoint, kind: str, passes: int, tokens: int, seed: int = 3) -> list[list[torch.Tensor]]:
    """`passes` forward passes, each a hidden-state tensor per MoE layer."""
    generator = torch.Generator().manual_seed(seed)
    layers, hidden_size = checkpoint.spec.moe_layers, checkpoint.spec.hidden_size
    if kind == "uniform":
        return [[torch.randn(tokens, hidden_size, generator=generator) for _ in layers] for _ in range(passes)]
    gates = [checkpoint.router_weights(layer).gate.float() for layer in layers]
    directions = [gate / gate.norm(dim=1, keepdim=True) for gate in gates]
    num_experts = gates[0].shape[0]
    follower = torch.roll(torch.arange(num_experts), 3)  # the expert each one leads to in the next layer
    passes_out = []
    for _ in range(passes):
        preferred = zipf_preferences(tokens, num_experts, 1.2, generator)
        hidden = []
        for direction in directions:
            # a token's k=2 experts come as a pair (its preferred one and that one's partner), as
            # correlated top-k choices do in trained routers; an unsteered second expert would be
            # uniform noise, and the uniform trace already measures that
            partner = (preferred + 1) % num_experts
            pull = 10.0 * (direction[preferred] + direction[partner])
            hidden.append(torch.randn(tokens, hidden_size, generator=generator) + pull)
            preferred = follower[preferred]
        passes_out.append(hidden)
    return passes_out


def worker_counters(stack: Stack) -> dict[str, float]:
    totals = dict.fromkeys(COUNTERS, 0.0)
    for record in stack.workers:
        with open_channel(record.address, [], stack.credentials) as channel:
            info = moe_grpc.ExpertWorkerStub(channel).Describe(moe_pb2.DescribeWorkerRequest(), timeout=10)
        state = WorkerRecord.from_proto(info).offload
        for name in COUNTERS:
            totals[name] += state.get(name, 0)
    return totals


def run_trace(stack: Stack, make_request: Any, passes: list[list[torch.Tensor]], layers: tuple[int, ...]) -> dict:
    latencies = []
    with grpc.insecure_channel(stack.address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        started = time.perf_counter()
        for sequence, hidden_per_layer in enumerate(passes):
            for layer, hidden in zip(layers, hidden_per_layer, strict=True):
                request = make_request(stack.model_name, hidden)
                request.parameters["layer"].int64_param = layer
                request.parameters["sequence_id"].int64_param = sequence
                sent = time.perf_counter()
                stub.ModelInfer(request, timeout=120)
                latencies.append((time.perf_counter() - sent) * 1000)
        elapsed = time.perf_counter() - started
    layer_tokens = sum(h.shape[0] for hidden_per_layer in passes for h in hidden_per_layer)
    return {
        "tokens_per_s": layer_tokens / elapsed,
        "latency_ms": asdict(Latency.of(latencies)),
        "layer_tokens": layer_tokens,
    }


def offload_comparison(
    checkpoint_dir: Path,
    make_request: Any,
    budgets: tuple[float, ...] = (1.0, 0.5, 0.25),
    tokens: int = 2,
    passes: int = 48,
    warmup_passes: int = 4,
    workers: int = 2,
) -> dict[str, Any]:
    checkpoint = Checkpoint(checkpoint_dir)
    layers = checkpoint.spec.moe_layers
    runs = []
    for kind in ("zipf", "uniform"):
        workload = trace(checkpoint, kind, warmup_passes + passes, tokens)
        for budget in budgets:
            for prefetch in (False, True):
                settings = UpSettings(
                    port=0,
                    http=False,
                    metrics=False,
                    workers=workers,
                    log_level="WARNING",
                    model_name="offload",
                    device_memory_budget=str(budget),
                    prefetch=prefetch,
                )
                stack = launch_stack(settings, checkpoint_dir, worker_actor=ExpertWorkerActor)
                try:
                    run_trace(stack, make_request, workload[:warmup_passes], layers)
                    before = worker_counters(stack)
                    measured = run_trace(stack, make_request, workload[warmup_passes:], layers)
                    after = worker_counters(stack)
                finally:
                    stack.stop()
                delta = {name: after[name] - before[name] for name in COUNTERS}
                uses = delta["hits"] + delta["misses"]
                runs.append(
                    {
                        "trace": kind,
                        "budget": budget,
                        "prefetch": prefetch,
                        **measured,
                        "hit_rate": delta["hits"] / uses if uses else 1.0,
                        "bytes_moved_per_token": delta["bytes_moved"] / measured["layer_tokens"],
                        "load_seconds": delta["load_seconds"],
                        "evictions": delta["evictions"],
                        "prefetched": delta["prefetched"],
                    }
                )
    return {"tokens_per_request": tokens, "passes": passes, "moe_layers": list(layers), "runs": runs}
