"""Benchmark section pieces for the Ray Serve comparison: the correctness gate and the concurrent run.

The served stack and the Ray Serve composition get the same requests (T tokens each, from the
same seeded inputs), the same number of client threads and the same rounds, alternating, so
machine drift hits both alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from moe_serve.bench.measure import ConcurrentRun, run_concurrent
from moe_serve.bench.rayserve import RayServeLayer, pack
from moe_serve.bench.reference import run_block
from moe_serve.bench.routing import run_clients

# the bound the served stack is tested to (FP32); other dtypes round differently per kernel
TOLERANCES = {torch.float32: 1e-5}
OTHER_DTYPE_TOLERANCE = 2e-2


def verify_against_reference(layer: RayServeLayer, reference: torch.nn.Module, hidden: torch.Tensor) -> float:
    """Max |difference| between the composition's and the transformers block's output on `hidden` [T, d].

    Raises RuntimeError beyond the tolerance: timing a composition that computes something else
    would compare nothing.
    """
    expected = run_block(reference, hidden)
    actual = layer(hidden)
    tolerance = TOLERANCES.get(hidden.dtype, OTHER_DTYPE_TOLERANCE)
    difference = float((actual.float() - expected.float()).abs().max())
    if actual.shape != expected.shape or not torch.allclose(
        actual.float(), expected.float(), rtol=tolerance, atol=tolerance
    ):
        raise RuntimeError(
            f"Ray Serve composition differs from the transformers block: max |diff| {difference:.3g} "
            f"(tolerance {tolerance:g}, shapes {tuple(actual.shape)} vs {tuple(expected.shape)})"
        )
    return difference


def concurrent_comparison(
    served_address: str,
    model_name: str,
    make_request: Callable[[str, torch.Tensor], Any],
    layer: RayServeLayer,
    hidden_size: int,
    dtype: torch.dtype,
    tokens: int,
    clients: int,
    requests_per_client: int,
    rounds: int,
    seed: int = 4,
) -> dict[str, Any]:
    """Throughput and latency of `clients` concurrent callers at T=`tokens`, served vs Ray Serve."""
    generator = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(tokens, hidden_size, generator=generator).to(dtype) for _ in range(16)]
    requests = [make_request(model_name, h) for h in hidden]
    packed = [pack(h) for h in hidden]

    @contextmanager
    def rayserve_client(index: int) -> Iterator[Callable[[int], int]]:
        def call(i: int) -> int:
            layer.call_packed(packed[(index + i) % len(packed)])
            return tokens

        yield call

    per_round = max(1, requests_per_client // rounds)
    served_runs: list[ConcurrentRun] = []
    rayserve_runs: list[ConcurrentRun] = []
    for _ in range(rounds):
        served_runs.append(run_clients(served_address, requests, clients, per_round))
        rayserve_runs.append(run_concurrent(rayserve_client, clients, per_round))
    return {
        "tokens": tokens,
        "clients": clients,
        "served": ConcurrentRun.merge(served_runs).summary(clients),
        "rayserve": ConcurrentRun.merge(rayserve_runs).summary(clients),
    }
