"""GPU figures of the benchmark: the layer's matmul work per token against the GPU's measured peak.

The issue asks for tokens/s and the fraction of the GPU's peak matmul throughput the served layer
reaches. The peak is measured in the same run (a large square matmul in the benchmark's dtype),
not taken from a datasheet, so the fraction holds for the clocks and the chip the run had.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PEAK_MATMUL_SIZE = 8192  # large enough to saturate a Hopper GPU's tensor cores
PEAK_MATMUL_REPEATS = 20


def layer_flops_per_token(hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> int:
    """Multiply-adds x 2 of one token through the layer: the router, then k SwiGLU experts (3 matmuls each)."""
    router = 2 * hidden_size * num_experts
    experts = top_k * 3 * 2 * hidden_size * intermediate_size
    return router + experts


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, size: int = PEAK_MATMUL_SIZE) -> float:
    """The best of a few timed `size`^3 matmuls on `device`, in TFLOP/s."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(3):  # warm-up: clocks ramp up, cuBLAS picks its kernel
        a @ b
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(PEAK_MATMUL_REPEATS):
        started = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12


def gpu_figures(
    served_tokens_per_s: float,
    reference_tokens_per_s: float,
    sweep: dict[str, list[dict[str, Any]]],
    config: Any,
    peak: float,
    device_name: str,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """tokens/s, TFLOP/s and the fraction of `peak` (TFLOP/s), served and in-process, at every measured T."""
    flops = layer_flops_per_token(config.hidden_size, config.intermediate_size, config.num_experts, config.top_k)

    def share(tokens_per_s: float) -> dict[str, float]:
        tflops = tokens_per_s * flops / 1e12
        return {"tokens_per_s": tokens_per_s, "tflops": tflops, "fraction_of_peak": tflops / peak}

    return {
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_matmul_tflops": peak,
        "peak_matmul_size": PEAK_MATMUL_SIZE,
        "flops_per_token": flops,
        "served": share(served_tokens_per_s),
        "reference": share(reference_tokens_per_s),
        # the same accounting at every T of the sweep (where it ran): where each subject's share peaks
        "sweep": {
            name: [{"tokens": point["tokens"], **share(point["tokens_per_s"])} for point in points]
            for name, points in sweep.items()
        },
    }
