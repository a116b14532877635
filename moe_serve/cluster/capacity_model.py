"""Capacity model of expert-parallel serving: bytes per token on each hop, where the NIC or the GPU
limits an expert GPU, and how many expert GPUs a model needs at a given traffic (docs/capacity.md).

Units: bytes, bytes/s, rows/s (a row is one token's hidden state sent to one of its k experts, in
one MoE layer), tokens/s (whole tokens through every MoE layer of the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# bytes on the wire per ideal byte, measured by `moe-serve bench` (ratios.wire_bytes_over_ideal):
# 1.0085 on the 2-core CPU VM (d=1024, top-2, FP32), 1.0051 on an H200 (d=1024, top-2, BF16)
MEASURED_WIRE_OVERHEAD = 1.0085


@dataclass(frozen=True)
class MoEShape:
    """One model's MoE shape: width d, expert FFN width, top-k, MoE layers, routed experts, dtype bytes."""

    name: str
    hidden_size: int
    expert_intermediate_size: int
    top_k: int
    moe_layers: int
    routed_experts: int
    dtype_bytes: int = 2

    @property
    def row_bytes(self) -> int:
        """One hidden state (or one expert output) on the wire: d x dtype bytes."""
        return self.hidden_size * self.dtype_bytes

    def bytes_per_token_per_layer(self) -> dict[str, int]:
        """Ideal bytes per token on each hop of one MoE layer (this stack: gateway -> router ->
        workers, outputs straight back to the gateway)."""
        return {
            "gateway_to_router": self.row_bytes,
            "router_to_workers": self.top_k * self.row_bytes,
            "workers_to_gateway": self.top_k * self.row_bytes,
            "total": (1 + 2 * self.top_k) * self.row_bytes,
        }

    @property
    def flops_per_row(self) -> int:
        """Gate, up and down projections of one expert: 3 matmuls of 2 x d x d_ff FLOPs."""
        return 6 * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size * self.dtype_bytes


DEEPSEEK_V3 = MoEShape("DeepSeek-V3", 7168, 2048, top_k=8, moe_layers=58, routed_experts=256)
MIXTRAL_8X7B = MoEShape("Mixtral-8x7B", 4096, 14336, top_k=2, moe_layers=32, routed_experts=8)


def nic_rows_per_s(shape: MoEShape, nic_gbit_s: float, remote_fraction: float = 1.0) -> float:
    """Rows/s one expert GPU's NIC carries: each row comes in (d bytes) and its output goes out (d
    bytes) on a full-duplex link, so each direction carries one row's bytes; rows that arrive over
    NVLink from the same node (1 - remote_fraction) do not touch the NIC."""
    per_row = shape.row_bytes * MEASURED_WIRE_OVERHEAD * remote_fraction
    return math.inf if per_row == 0 else nic_gbit_s * 1e9 / 8 / per_row


def gpu_rows_per_s(shape: MoEShape, peak_tflops: float, utilisation: float) -> float:
    """Rows/s one GPU computes at `utilisation` of its `peak_tflops` (dense BF16)."""
    return peak_tflops * 1e12 * utilisation / shape.flops_per_row


def crossover_nic_gbit_s(shape: MoEShape, peak_tflops: float, utilisation: float) -> float:
    """The NIC speed at which the network stops being the limit (all rows remote)."""
    return gpu_rows_per_s(shape, peak_tflops, utilisation) * shape.row_bytes * MEASURED_WIRE_OVERHEAD * 8 / 1e9


def tokens_per_s_per_gpu(shape: MoEShape, rows_per_s: float) -> float:
    """Whole tokens/s per expert GPU, when every GPU holds slots of every MoE layer: k x layers rows a token."""
    return rows_per_s / (shape.top_k * shape.moe_layers)


def expert_gpus_needed(
    shape: MoEShape,
    tokens_per_s: float,
    rows_per_s_per_gpu: float,
    gpu_memory_gib: float,
    redundant_fraction: float = 0.125,
    memory_for_experts: float = 0.85,
) -> dict[str, int]:
    """Expert GPUs for `tokens_per_s`: enough for the rows (rate) and for the weights (memory)."""
    rate = math.ceil(tokens_per_s * shape.top_k * shape.moe_layers / rows_per_s_per_gpu)
    weights = shape.routed_experts * shape.moe_layers * (1 + redundant_fraction) * shape.expert_bytes
    memory = math.ceil(weights / (gpu_memory_gib * 2**30 * memory_for_experts))
    return {"for_rate": rate, "for_memory": memory, "gpus": max(rate, memory)}
