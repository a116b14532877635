"""Benchmark section: single-client throughput against request size T, for every subject.

The data behind the throughput plot. Subjects alternate within each round and each T, so a
drift of the machine's speed hits them all alike; requests are built before the clock starts,
so only the call is timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SWEEP_TOKENS = (1, 16, 64, 256, 1024, 2048)


@dataclass
class SweepSubject:
    """prepare: hidden [T, d] -> the payload `call` sends (a protobuf request, packed tensor, ...)."""

    name: str
    prepare: Callable[[torch.Tensor], Any]
    call: Callable[[Any], object]


def requests_per_round(tokens: int) -> int:
    """Calls per subject, T and round: several at small T (one call is a noisy sample), one at large T."""
    return max(1, min(16, 1024 // tokens))


def throughput_sweep(
    subjects: list[SweepSubject],
    hidden_size: int,
    dtype: torch.dtype,
    rounds: int,
    token_counts: tuple[int, ...] = SWEEP_TOKENS,
    seed: int = 3,
) -> dict[str, list[dict[str, Any]]]:
    """{subject: [{"tokens": T, "tokens_per_s": ..., "requests": n}, ...]} in the order of `token_counts`."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        tokens: [
            torch.randn(tokens, hidden_size, generator=generator).to(dtype) for _ in range(requests_per_round(tokens))
        ]
        for tokens in token_counts
    }
    payloads = {s.name: {t: [s.prepare(hidden) for hidden in inputs[t]] for t in token_counts} for s in subjects}
    for subject in subjects:  # warm-up, unmeasured: the first call at a new size allocates its buffers
        for tokens in token_counts:
            subject.call(payloads[subject.name][tokens][0])
    seconds = {(s.name, t): 0.0 for s in subjects for t in token_counts}
    calls = dict.fromkeys(seconds, 0)
    for _ in range(rounds):
        for tokens in token_counts:
            for subject in subjects:
                batch = payloads[subject.name][tokens]
                started = time.perf_counter()
                for payload in batch:
                    subject.call(payload)
                seconds[subject.name, tokens] += time.perf_counter() - started
                calls[subject.name, tokens] += len(batch)
    return {
        s.name: [
            {
                "tokens": t,
                "tokens_per_s": t * calls[s.name, t] / seconds[s.name, t],
                "requests": calls[s.name, t],
            }
            for t in token_counts
        ]
        for s in subjects
    }
