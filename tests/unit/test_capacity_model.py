"""The capacity model's formulas against the byte counts `moe-serve bench` measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_serve.cluster.capacity_model import (
    DEEPSEEK_V3,
    MIXTRAL_8X7B,
    MoEShape,
    crossover_nic_gbit_s,
    expert_gpus_needed,
    gpu_rows_per_s,
    nic_rows_per_s,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.parametrize("result", ["latest.json", "gpu/latest.json"])
def test_ideal_bytes_match_the_measured_wire_bytes_within_one_percent(result: str) -> None:
    data = json.loads((RESULTS / result).read_text())
    config = data["config"]
    shape = MoEShape(
        "bench",
        config["hidden_size"],
        config["intermediate_size"],
        config["top_k"],
        moe_layers=1,
        routed_experts=config["num_experts"],
        dtype_bytes={"float32": 4, "bfloat16": 2, "float16": 2}[config["dtype"]],
    )
    measured = data["served"]["internal_wire_bytes_per_token"]
    assert 1.0 <= measured / shape.bytes_per_token_per_layer()["total"] <= 1.01


def test_deepseek_v3_is_network_bound_and_mixtral_compute_bound_at_the_same_nic() -> None:
    assert DEEPSEEK_V3.bytes_per_token_per_layer()["total"] == 17 * 7168 * 2
    assert nic_rows_per_s(DEEPSEEK_V3, 400) < gpu_rows_per_s(DEEPSEEK_V3, 989, 0.4)
    assert nic_rows_per_s(MIXTRAL_8X7B, 100) > gpu_rows_per_s(MIXTRAL_8X7B, 989, 0.4)
    assert crossover_nic_gbit_s(DEEPSEEK_V3, 989, 0.4) > 400 > 100 > crossover_nic_gbit_s(MIXTRAL_8X7B, 989, 0.4)
    # rows served inside the node (NVLink) take no NIC bandwidth
    assert nic_rows_per_s(DEEPSEEK_V3, 100, remote_fraction=0.5) == pytest.approx(2 * nic_rows_per_s(DEEPSEEK_V3, 100))


def test_gpus_needed_is_the_larger_of_rate_and_memory() -> None:
    rate = min(nic_rows_per_s(DEEPSEEK_V3, 400), gpu_rows_per_s(DEEPSEEK_V3, 989, 0.4))
    sized = expert_gpus_needed(DEEPSEEK_V3, 100_000, rate, gpu_memory_gib=80)
    assert sized["gpus"] == max(sized["for_rate"], sized["for_memory"]) and sized["for_memory"] > sized["for_rate"]
    assert expert_gpus_needed(DEEPSEEK_V3, 1_000_000, rate, gpu_memory_gib=80)["gpus"] > sized["gpus"]
