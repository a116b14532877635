"""Benchmark section: gateway pipelining, single-client tokens/s at large T with and without chunks.

An extra gateway per chunk size shares the stack's router and workers, so only the gateway's
`--pipeline-chunk-tokens` differs between subjects; they alternate within each round (sweep.py).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import grpc
import torch

from moe_serve.bench.routing import extra_gateway
from moe_serve.bench.sweep import SweepSubject, throughput_sweep
from moe_serve.cluster.launcher import Stack
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.runtime.grpc_utils import channel_options
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc

CHUNK_TOKENS = (256, 512, 1024)
PIPELINING_TOKENS = (512, 2048, 8192)


def pipelining_comparison(
    stack: Stack,
    make_request: Any,
    hidden_size: int,
    dtype: torch.dtype,
    rounds: int,
    chunk_tokens: tuple[int, ...] = CHUNK_TOKENS,
    token_counts: tuple[int, ...] = PIPELINING_TOKENS,
) -> dict[str, list[dict[str, Any]]]:
    """{"whole" or "chunks of N": [{"tokens", "tokens_per_s", "requests"}, ...]} for each T."""
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    with ExitStack() as cleanup:
        addresses = {"whole": stack.address}
        for chunk in chunk_tokens:
            gateway = extra_gateway(stack, f"gateway-chunks-{chunk}", "--pipeline-chunk-tokens", str(chunk))
            cleanup.callback(gateway.stop)
            addresses[f"chunks of {chunk}"] = gateway.address
        subjects = []
        for name, address in addresses.items():
            channel = cleanup.enter_context(grpc.insecure_channel(address, options=options))
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            subjects.append(
                SweepSubject(
                    name,
                    prepare=lambda hidden: make_request(stack.model_name, hidden),
                    call=lambda request, s=stub: s.ModelInfer(request, timeout=300),
                )
            )
        return throughput_sweep(subjects, hidden_size, dtype, rounds, token_counts, seed=5)
