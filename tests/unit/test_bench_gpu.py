"""The benchmark's GPU accounting and its refusals, checked without a GPU (tests/integration/test_gpu.py runs
it on one)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from moe_serve.bench.gpu import gpu_figures, layer_flops_per_token
from moe_serve.bench.report import print_gpu_report
from moe_serve.bench.runner import BenchConfig, BenchResult
from moe_serve.cli.main import app


def test_flops_per_token_counts_the_router_and_k_swiglu_experts() -> None:
    # standard shape: router 1024x8, two experts of three 1024x2816 matmuls, 2 FLOPs per multiply-add
    assert layer_flops_per_token(1024, 2816, 8, 2) == 2 * 1024 * 8 + 2 * (2 * 1024 * 2816 * 3)
    assert layer_flops_per_token(1024, 2816, 8, 2) == 34_619_392


def test_gpu_figures_are_tokens_per_s_against_the_measured_peak() -> None:
    config = BenchConfig()
    sweep = {"served": [{"tokens": 1, "tokens_per_s": 100.0}, {"tokens": 2048, "tokens_per_s": 50_000.0}]}
    figures = gpu_figures(40_000.0, 1_000_000.0, sweep, config, 800.0, "Test GPU", torch.bfloat16)
    flops = 34_619_392
    assert figures["served"]["tflops"] == pytest.approx(40_000 * flops / 1e12)
    assert figures["served"]["fraction_of_peak"] == pytest.approx(40_000 * flops / 1e12 / 800)
    assert figures["reference"]["fraction_of_peak"] == pytest.approx(1e6 * flops / 1e12 / 800)
    assert [point["tokens"] for point in figures["sweep"]["served"]] == [1, 2048]
    assert figures["sweep"]["served"][1]["tflops"] == pytest.approx(50_000 * flops / 1e12)
    assert figures["dtype"] == "bfloat16" and figures["peak_matmul_tflops"] == 800.0

    result = BenchResult(config={"throughput_tokens": 2048}, machine={}, gpu=figures)
    console = Console(record=True, width=200)
    print_gpu_report(result, console)
    text = " ".join(console.export_text().split())  # the title wraps
    assert "Test GPU, bfloat16" in text and "800 TFLOP/s" in text
    assert "0.17%" in text  # served: 1.385 TFLOP/s of 800
    assert "served (sweep, best T)" in text and "2048" in text


def test_sections_that_start_cpu_stacks_are_refused_on_cuda() -> None:
    with pytest.raises(ValueError, match="offload, rayserve, replication run on the CPU only"):
        BenchConfig(device="cuda")
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        BenchConfig(device="tpu")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--device", "cuda", "--sections", "sweep,rayserve"], "rayserve run on the CPU only"),
        (["--sweep-tokens", "1,abc"], "--sweep-tokens takes positive whole numbers"),
        (["--sweep-tokens", "0,16"], "--sweep-tokens takes positive whole numbers"),
    ],
)
def test_bench_refuses_bad_options_before_starting_anything(arguments: list[str], message: str) -> None:
    outcome = CliRunner().invoke(app, ["bench", *arguments])
    assert outcome.exit_code == 2
    assert message in " ".join(outcome.output.split())
    assert "Traceback" not in outcome.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_cuda_without_a_gpu_says_so() -> None:
    outcome = CliRunner().invoke(app, ["bench", "--device", "cuda", "--sections", "sweep"])
    assert outcome.exit_code == 2
    assert "torch sees no CUDA GPU" in outcome.output
