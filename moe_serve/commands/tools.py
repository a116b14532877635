"""Tool commands: `moe-serve init-demo`, `infer`, `bench`, `health`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moe_serve.commands.common import app, console
from moe_serve.grpc_utils import configure_logging


@app.command("init-demo")
def init_demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_experts: int = 8,
    top_k: int = 2,
    num_layers: int = 2,
    dtype: str = "float32",
    seed: int = 0,
) -> None:
    """Write a small deterministic random Mixtral-layout checkpoint (no download)."""
    from moe_serve.demo import DemoShape, write_demo_checkpoint

    shape = DemoShape(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        num_layers=num_layers,
        dtype=dtype,
        seed=seed,
    )
    try:
        path = write_demo_checkpoint(directory, shape)
    except ValueError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(2) from None
    console.print(
        f"wrote demo checkpoint to {path} ({num_layers} MoE layers, {num_experts} experts, top-{top_k}, "
        f"d={hidden_size}, d_ff={intermediate_size}, {dtype})"
    )


@app.command()
def infer(
    url: Annotated[str, typer.Option(help="Gateway host:port.")] = "127.0.0.1:8001",
    model: Annotated[str | None, typer.Option(help="Model name (default: the demo model).")] = None,
    tokens: Annotated[int, typer.Option(help="Random tokens to send (ignored with --input).")] = 8,
    input_file: Annotated[Path | None, typer.Option("--input", help=".npy file of hidden states [T, d].")] = None,
    layer: Annotated[int, typer.Option(help="MoE layer.")] = 0,
    datatype: Annotated[str, typer.Option(help="FP32, FP16 or BF16 for random input.")] = "FP32",
    repeat: Annotated[int, typer.Option(help="Send the request this many times; report latency.")] = 1,
    seed: int = 0,
    timeout: Annotated[float, typer.Option(help="Deadline per request, in seconds.")] = 30.0,
) -> None:
    """Send a request to a gateway and print a summary of the answer."""
    from moe_serve.infer_command import run_infer

    raise typer.Exit(
        run_infer(
            console,
            url=url,
            model=model,
            tokens=tokens,
            input_file=input_file,
            layer=layer,
            datatype=datatype,
            repeat=repeat,
            seed=seed,
            timeout=timeout,
        )
    )


@app.command()
def bench(
    hidden_size: int = 1024,
    intermediate_size: int = 2816,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    workers: Annotated[int, typer.Option(help="Expert workers of the served stack.")] = 2,
    latency_requests: Annotated[int, typer.Option(help="Requests timed at T=1.")] = 200,
    throughput_tokens: Annotated[int, typer.Option(help="T of the throughput requests.")] = 2048,
    throughput_requests: Annotated[int, typer.Option(help="Requests timed for throughput.")] = 10,
    rounds: Annotated[int, typer.Option(help="Alternating measurement rounds.")] = 5,
    sections: Annotated[
        str,
        typer.Option(help="Extra sections, comma-separated: concurrency, capacity, replication ('' for none)."),
    ] = "concurrency,capacity,replication",
    output_dir: Annotated[Path, typer.Option(help="Where the JSON results go.")] = Path("benchmarks/results"),
) -> None:
    """Measure the served layer against the in-process transformers block and a bare gRPC echo, in one run."""
    from moe_serve.bench.report import print_replication_report, print_report, print_routing_report
    from moe_serve.bench.runner import BenchConfig, run_bench, write_result

    configure_logging("WARNING")
    config = BenchConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        dtype=dtype,
        workers=workers,
        latency_requests=latency_requests,
        throughput_tokens=throughput_tokens,
        throughput_requests=throughput_requests,
        rounds=rounds,
        sections=tuple(filter(None, (part.strip() for part in sections.split(",")))),
        output_dir=output_dir,
    )
    result = run_bench(config)
    print_report(result, Console())
    print_routing_report(result, Console())
    print_replication_report(result, Console())
    console.print(f"results written to {write_result(result, output_dir)}")


@app.command()
def health(
    address: Annotated[str, typer.Argument(help="host:port of any moe-serve service.")],
    service: Annotated[str, typer.Option(help="Service name to ask about ('' = the whole server).")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 3.0,
) -> None:
    """Exit 0 when the service answers SERVING on grpc.health.v1 (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            console.print(f"{address}: {error.code().name}: {error.details()}")
            raise typer.Exit(1) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    console.print(f"{address}: {status}")
    raise typer.Exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
