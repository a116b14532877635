"""Runs the benchmark: reference block, bare echo and served stack measured in one process tree."""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from moe_serve import codec
from moe_serve.bench.measure import loopback_tx_bytes, rss_mib, throughput, time_calls
from moe_serve.bench.reference import reference_block, run_block
from moe_serve.checkpoint import Checkpoint
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES, UpSettings
from moe_serve.demo import DemoShape, ensure_demo_checkpoint
from moe_serve.grpc_utils import channel_options
from moe_serve.launcher import Stack, init_ray, launch_stack, start_service_process
from moe_serve.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve.protos import grpc_predict_v2_pb2_grpc as kserve_grpc

logger = logging.getLogger(__name__)
ECHO_PAYLOAD_BYTES = 4096
# T=1 is timed over this many distinct tokens in turn: a single repeated token would always pick
# the same two experts (and maybe the same worker), which is not what a real stream of tokens does
T1_DISTINCT_TOKENS = 64


@dataclass
class BenchConfig:
    """The standard shape by default: d=1024, d_ff=2816, E=8, top-2, FP32."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_experts: int = 8
    top_k: int = 2
    dtype: str = "float32"
    workers: int = 2
    latency_requests: int = 200
    throughput_tokens: int = 2048
    throughput_requests: int = 6
    checkpoint_root: Path = Path(".moe-serve")
    output_dir: Path = Path("benchmarks/results")


@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    reference: dict[str, Any] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)
    echo: dict[str, Any] = field(default_factory=dict)
    memory_mib: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def bench_checkpoint(config: BenchConfig) -> Path:
    shape = DemoShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_experts=config.num_experts,
        top_k=config.top_k,
        num_layers=1,
        dtype=config.dtype,
    )
    name = f"bench-d{shape.hidden_size}-ff{shape.intermediate_size}-e{shape.num_experts}-k{shape.top_k}-{shape.dtype}"
    return ensure_demo_checkpoint(config.checkpoint_root / name, shape)


def make_request(model: str, hidden: torch.Tensor) -> kserve_pb2.ModelInferRequest:
    return kserve_pb2.ModelInferRequest(
        model_name=model,
        inputs=[
            kserve_pb2.ModelInferRequest.InferInputTensor(
                name="hidden_states", datatype=codec.datatype_name(hidden.dtype), shape=list(hidden.shape)
            )
        ],
        raw_input_contents=[codec.tensor_to_bytes(hidden)],
    )


def measure_reference(checkpoint: Checkpoint, config: BenchConfig, inputs: dict[int, torch.Tensor]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for implementation in ("eager", "grouped_mm"):
        block = reference_block(checkpoint, 0, implementation, checkpoint.spec.dtype)
        tokens = itertools.cycle(inputs[1].split(1))
        t1 = time_calls(lambda b=block, t=tokens: run_block(b, next(t)), config.latency_requests)
        tokens_per_s = throughput(
            lambda b=block: run_block(b, inputs[config.throughput_tokens]),
            config.throughput_tokens,
            config.throughput_requests,
        )
        results[implementation] = {"t1_latency_ms": asdict(t1), "tokens_per_s": tokens_per_s}
    best = max(results, key=lambda name: results[name]["tokens_per_s"])
    fastest_t1 = min(results, key=lambda name: results[name]["t1_latency_ms"]["p50"])
    results["best_throughput"] = best
    results["best_t1"] = fastest_t1
    return results


def measure_echo(count: int) -> dict[str, Any]:
    server = start_service_process("echo", [], module="moe_serve.bench.echo")
    try:
        with grpc.insecure_channel(server.address) as channel:
            echo = channel.unary_unary("/moe_serve.bench.Echo/Echo")
            payload = os.urandom(ECHO_PAYLOAD_BYTES)
            latency = time_calls(lambda: echo(payload, timeout=10), count, warmup=20)
    finally:
        server.stop()
    return {"payload_bytes": ECHO_PAYLOAD_BYTES, "latency_ms": asdict(latency)}


def measure_served(stack: Stack, config: BenchConfig, inputs: dict[int, torch.Tensor]) -> dict[str, Any]:
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    with grpc.insecure_channel(stack.address, options=options) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        small = itertools.cycle([make_request(stack.model_name, token) for token in inputs[1].split(1)])
        t1 = time_calls(lambda: stub.ModelInfer(next(small), timeout=30), config.latency_requests, warmup=20)

        large = make_request(stack.model_name, inputs[config.throughput_tokens])
        stub.ModelInfer(large, timeout=120)  # warm the large-message path
        client_bytes = 0

        def call() -> None:
            nonlocal client_bytes
            response = stub.ModelInfer(large, timeout=120)
            client_bytes += large.ByteSize() + response.ByteSize()

        before = loopback_tx_bytes()
        tokens_per_s = throughput(call, config.throughput_tokens, config.throughput_requests, warmup=0)
        wire = loopback_tx_bytes() - before
    tokens = config.throughput_tokens * config.throughput_requests
    # loopback carries the client's own request/response too; the hops of the layer are the rest
    internal_bytes_per_token = (wire - client_bytes) / tokens
    return {
        "t1_latency_ms": asdict(t1),
        "tokens_per_s": tokens_per_s,
        "internal_wire_bytes_per_token": internal_bytes_per_token,
    }


WORKER_OVERHEAD_TARGET_MIB = 400  # a worker may use its experts' weights plus this much
SERVICE_TARGET_MIB = 500  # gateway and router


def measure_memory(stack: Stack, checkpoint: Checkpoint) -> dict[str, dict[str, float]]:
    """Resident memory of every service with its target, MiB."""
    import ray

    spec = checkpoint.spec
    expert_mib = 3 * spec.hidden_size * spec.expert_intermediate_size * spec.dtype.itemsize / 2**20
    memory = {
        name: {"rss": rss_mib(process.process.pid), "target": SERVICE_TARGET_MIB}
        for name, process in (("gateway", stack.gateway), ("router", stack.router))
    }
    pids = ray.get([handle.pid.remote() for handle in stack.worker_handles])
    for record, pid in zip(stack.workers, pids, strict=True):
        target = len(record.experts) * expert_mib + WORKER_OVERHEAD_TARGET_MIB
        memory[f"worker {record.worker_id}"] = {"rss": rss_mib(pid), "target": target}
    return memory


def run_bench(config: BenchConfig) -> BenchResult:
    import ray

    checkpoint_dir = bench_checkpoint(config)
    checkpoint = Checkpoint(checkpoint_dir)
    dtype = checkpoint.spec.dtype
    generator = torch.Generator().manual_seed(0)
    # inputs[1] holds the distinct single tokens the T=1 measurements cycle through
    inputs = {
        1: torch.randn(T1_DISTINCT_TOKENS, config.hidden_size, generator=generator).to(dtype),
        config.throughput_tokens: torch.randn(config.throughput_tokens, config.hidden_size, generator=generator).to(
            dtype
        ),
    }
    result = BenchResult(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, machine=machine_info()
    )
    init_ray(log_to_driver=False)
    stack = launch_stack(UpSettings(port=0, workers=config.workers, log_level="WARNING"), checkpoint_dir)
    try:
        # everything below runs with the stack up, so the reference sees the same background load
        result.reference = measure_reference(checkpoint, config, inputs)
        result.echo = measure_echo(config.latency_requests)
        result.served = measure_served(stack, config, inputs)
        result.memory_mib = measure_memory(stack, checkpoint)
    finally:
        stack.stop()
        ray.shutdown()
    result.ratios = compute_ratios(result, config, checkpoint)
    return result


def compute_ratios(result: BenchResult, config: BenchConfig, checkpoint: Checkpoint) -> dict[str, float]:
    reference = result.reference
    best = reference[reference["best_throughput"]]
    fastest_t1 = reference[reference["best_t1"]]["t1_latency_ms"]["p50"]
    echo_p50 = result.echo["latency_ms"]["p50"]
    hop_cost = result.served["t1_latency_ms"]["p50"] - fastest_t1
    itemsize = checkpoint.spec.dtype.itemsize
    ideal_bytes = (1 + 2 * config.top_k) * config.hidden_size * itemsize
    return {
        "throughput_served_over_reference": result.served["tokens_per_s"] / best["tokens_per_s"],
        "t1_hop_cost_ms": hop_cost,
        "t1_hop_cost_in_echoes": hop_cost / echo_p50,
        "wire_bytes_over_ideal": result.served["internal_wire_bytes_per_token"] / ideal_bytes,
    }


def write_result(result: BenchResult, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = output_dir / f"bench-{stamp}.json"
    text = json.dumps(asdict(result), indent=2)
    path.write_text(text)
    (output_dir / "latest.json").write_text(text)
    return path
