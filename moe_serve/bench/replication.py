"""Benchmark section: a skewed load on 4 workers, without and with replication of the hot expert.

Expert choice follows a Zipf-like law: each token leans towards one expert drawn with the hot
expert (0) first, so that expert receives at least ~40% of all rows. The same requests run twice
against one stack: first with the standard placement (one replica per expert), then after the
controller's rebalance (the node-aware placement planner) replicated the hot expert within the
same worker budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from expert_service.actor import ExpertWorkerActor
from moe_serve.bench.routing import client_run
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.launcher import launch_stack
from moe_serve.cluster.placement import ExpertKey
from moe_serve.config import UpSettings


def zipf_preferences(num_tokens: int, num_experts: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    probabilities = ranks.pow(-exponent)
    return torch.multinomial(probabilities / probabilities.sum(), num_tokens, replacement=True, generator=generator)


def skewed_tokens(
    gate: torch.Tensor, num_tokens: int, generator: torch.Generator, exponent: float = 3.0, pull: float = 10.0
) -> torch.Tensor:
    """Hidden states pulled towards Zipf-drawn experts' router directions."""
    directions = gate.float() / gate.float().norm(dim=1, keepdim=True)
    preferred = zipf_preferences(num_tokens, gate.shape[0], exponent, generator)
    return torch.randn(num_tokens, gate.shape[1], generator=generator) + pull * directions[preferred]


def row_share(gate: torch.Tensor, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
    """Share of all routed rows each expert receives."""
    ids = torch.topk(hidden @ gate.float().t(), top_k, dim=-1).indices
    return torch.bincount(ids.reshape(-1), minlength=gate.shape[0]).float() / ids.numel()


def replication_comparison(
    checkpoint_dir: Path,
    make_request: Any,
    tokens: int = 256,
    client_counts: tuple[int, ...] = (1, 4),
    requests: int = 32,
    workers: int = 4,
) -> dict[str, Any]:
    import ray

    checkpoint = Checkpoint(checkpoint_dir)
    gate, top_k = checkpoint.router_weights(0).gate, checkpoint.spec.top_k
    generator = torch.Generator().manual_seed(5)
    inputs = [skewed_tokens(gate, tokens, generator) for _ in range(16)]
    share = row_share(gate, torch.cat(inputs), top_k)
    settings = UpSettings(port=0, http=False, metrics=False, workers=workers, log_level="WARNING", model_name="skewed")
    stack = launch_stack(settings, checkpoint_dir, worker_actor=ExpertWorkerActor)
    try:
        prepared = [make_request(stack.model_name, hidden) for hidden in inputs]
        ray.get(stack.controller.rebalance.remote())  # opens the load window
        without = [client_run(stack.address, prepared, n, requests // n) for n in client_counts]
        report = ray.get(stack.controller.rebalance.remote(None, 0.0))  # replicate the hot expert, same workers
        replicas = sum(1 for record in stack.workers if ExpertKey(0, 0) in record.experts)
        with_replication = [client_run(stack.address, prepared, n, requests // n) for n in client_counts]
    finally:
        stack.stop()
    return {
        "workers": workers,
        "tokens_per_request": tokens,
        "hot_expert_row_share": float(share.max()),
        "hot_expert_replicas": replicas,
        "imbalance_before": report["layers"][0]["imbalance"],
        "imbalance_after": report["layers"][0]["planned"],
        "runs": [
            {
                "clients": before["clients"],
                "without_replication": before,
                "with_replication": after,
                "throughput_gain": after["tokens_per_s"] / before["tokens_per_s"],
                "p99_gain": before["latency_ms"]["p99"] / after["latency_ms"]["p99"],
            }
            for before, after in zip(without, with_replication, strict=True)
        ],
    }
