"""The `moe-serve` command line: run the stack or one service, send a request, make a demo checkpoint.

Every flag has an environment variable twin with the MOE_SERVE_ prefix (e.g. --redis-url and
MOE_SERVE_REDIS_URL); a flag given on the command line wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from moe_serve.config import GatewaySettings, RouterSettings, UpSettings, WorkerSettings, WorkersSettings
from moe_serve.errors import ConfigurationError
from moe_serve.grpc_utils import configure_logging

app = typer.Typer(
    name="moe-serve",
    help="Distributed serving of Mixture-of-Experts layers over gRPC (KServe v2 API).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
SettingsT = TypeVar("SettingsT", bound=BaseModel)

# options shared by the service commands
Host = Annotated[str | None, typer.Option(help="Interface to bind (0.0.0.0 for remote callers).")]
AdvertiseHost = Annotated[str | None, typer.Option(help="Host name other services dial to reach this one.")]
RedisUrl = Annotated[str | None, typer.Option(help="Redis URL of the shared worker registry.")]
RedisPrefix = Annotated[str | None, typer.Option(help="Key prefix in Redis.")]
RegistryTtl = Annotated[
    float | None, typer.Option("--registry-ttl", help="Seconds a registration lives without heartbeat.")
]
LogLevel = Annotated[str | None, typer.Option(help="Logging level (DEBUG, INFO, WARNING).")]
MaxMessageBytes = Annotated[int | None, typer.Option(help="Largest gRPC message on every hop, in bytes.")]
Dtype = Annotated[str | None, typer.Option(help="Compute dtype: auto (the checkpoint's), float32, bfloat16, float16.")]
ModelName = Annotated[str | None, typer.Option(help="Public model name (default: checkpoint directory name).")]
CheckpointDir = Annotated[Path | None, typer.Option(help="Hugging Face checkpoint directory (safetensors).")]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        help="Serve Prometheus metrics on this port (0 = any free); OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set."
    ),
]
CapacityFactor = Annotated[
    float | None,
    typer.Option(
        help="Expert capacity factor C = ceil(f*T*k/E); unset: the "
        "model's own behaviour (dropless, Switch: its capacity)."
    ),
]
Overflow = Annotated[str | None, typer.Option(help="Over capacity: drop, reroute or dropless.")]
BatchWindow = Annotated[float | None, typer.Option(help="Cross-request batching window in ms (0 = off).")]


def build_settings(settings_class: type[SettingsT], **flags: Any) -> SettingsT:
    """Settings from the environment, overridden by the flags that were given."""
    try:
        return settings_class(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "settings"
            console.print(f"[red]invalid {field}[/red]: {problem['msg']}")
        raise typer.Exit(2) from None


def run_service(coroutine: Any) -> None:
    try:
        asyncio.run(coroutine)
    except ConfigurationError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None


@app.command()
def gateway(
    port: Annotated[int | None, typer.Option(help="Public KServe v2 gRPC port.")] = None,
    delivery_port: Annotated[int | None, typer.Option(help="Internal port for expert deliveries (0 = any).")] = None,
    router_address: Annotated[str | None, typer.Option(help="host:port of the router.")] = None,
    model_name: ModelName = None,
    capacity_factor: CapacityFactor = None,
    expert_capacity: Annotated[int | None, typer.Option(help="Absolute rows per expert per dispatch batch.")] = None,
    overflow: Overflow = None,
    max_inflight_tokens: Annotated[int | None, typer.Option(help="Admission bound on tokens in flight.")] = None,
    max_request_tokens: Annotated[int | None, typer.Option(help="Largest T per request.")] = None,
    max_inflight_rows_per_replica: Annotated[
        int | None, typer.Option(help="Bound on rows in flight per expert replica (0 = none).")
    ] = None,
    batch_window_ms: BatchWindow = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="Most tokens in one cross-request batch.")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Deadline (s) when the client sets none.")] = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    metrics_port: MetricsPort = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
    live_state_interval: Annotated[
        float | None, typer.Option(help="Seconds between live-state writes to Redis.")
    ] = None,
    max_message_bytes: MaxMessageBytes = None,
) -> None:
    """Run the gateway: the public KServe v2 endpoint, admission, capacity policy, combine."""
    from gateway.server import serve

    settings = build_settings(
        GatewaySettings,
        port=port,
        delivery_port=delivery_port,
        router_address=router_address,
        model_name=model_name,
        capacity_factor=capacity_factor,
        expert_capacity=expert_capacity,
        overflow=overflow,
        max_inflight_tokens=max_inflight_tokens,
        max_request_tokens=max_request_tokens,
        max_inflight_rows_per_replica=max_inflight_rows_per_replica,
        batch_window_ms=batch_window_ms,
        max_batch_tokens=max_batch_tokens,
        request_timeout_s=request_timeout,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        metrics_port=metrics_port,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        live_state_interval_s=live_state_interval,
        max_message_bytes=max_message_bytes,
    )
    configure_logging(settings.log_level)
    run_service(serve(settings))


@app.command()
def router(
    checkpoint: CheckpointDir = None,
    port: Annotated[int | None, typer.Option(help="Router gRPC port.")] = None,
    split_min_rows: Annotated[
        int | None, typer.Option(help="Split an expert's rows over its replicas from twice this many rows (0 = never).")
    ] = None,
    model_name: ModelName = None,
    dtype: Dtype = None,
    noisy_gating_std: Annotated[
        float | None,
        typer.Option(help="Noisy top-k gating for experiments: noise std added to router logits (0 = off)."),
    ] = None,
    noisy_gating_seed: Annotated[int | None, typer.Option(help="Seed of the noisy-gating generator.")] = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    metrics_port: MetricsPort = None,
    max_message_bytes: MaxMessageBytes = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
    registry_ttl: RegistryTtl = None,
) -> None:
    """Run the router: gating, capacity, replica choice, fan-out to the expert workers."""
    from router_service.server import serve

    settings = build_settings(
        RouterSettings,
        checkpoint=checkpoint,
        port=port,
        split_min_rows=split_min_rows,
        model_name=model_name,
        dtype=dtype,
        noisy_gating_std=noisy_gating_std,
        noisy_gating_seed=noisy_gating_seed,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        metrics_port=metrics_port,
        max_message_bytes=max_message_bytes,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        registry_ttl_s=registry_ttl,
    )
    configure_logging(settings.log_level)
    run_service(serve(settings))


@app.command()
def worker(
    checkpoint: CheckpointDir = None,
    port: Annotated[int | None, typer.Option(help="Worker gRPC port (0 = any free port).")] = None,
    experts: Annotated[str | None, typer.Option(help="Expert ids to serve, e.g. '0-3,6' (all MoE layers).")] = None,
    worker_index: Annotated[int | None, typer.Option(help="Index in the placement plan.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="Workers in the placement plan.")] = None,
    worker_id: Annotated[str | None, typer.Option(help="Registry id of this worker.")] = None,
    router_address: Annotated[
        str | None, typer.Option(help="Register in this router's registry (when --redis-url is not given).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    compute_threads: Annotated[int | None, typer.Option(help="Experts computed concurrently.")] = None,
    torch_threads: Annotated[int | None, typer.Option(help="torch intra-op threads.")] = None,
    dtype: Dtype = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    metrics_port: MetricsPort = None,
    max_message_bytes: MaxMessageBytes = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
    registry_ttl: RegistryTtl = None,
) -> None:
    """Run one expert worker process (no Ray): load its experts, serve them, register in Redis."""
    from expert_service.server import serve

    settings = build_settings(
        WorkerSettings,
        checkpoint=checkpoint,
        port=port,
        experts=experts,
        worker_index=worker_index,
        num_workers=num_workers,
        worker_id=worker_id,
        router_address=router_address,
        device=device,
        compute_threads=compute_threads,
        torch_threads=torch_threads,
        dtype=dtype,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        metrics_port=metrics_port,
        max_message_bytes=max_message_bytes,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        registry_ttl_s=registry_ttl,
    )
    configure_logging(settings.log_level)
    run_service(serve(settings))


@app.command()
def up(
    checkpoint: CheckpointDir = None,
    workers: Annotated[int | None, typer.Option(help="Expert workers (Ray actors).")] = None,
    port: Annotated[int | None, typer.Option(help="Public gateway port.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    worker_num_gpus: Annotated[float | None, typer.Option(help="GPUs per worker actor (1 on a GPU cluster).")] = None,
    worker_num_cpus: Annotated[float | None, typer.Option(help="CPUs Ray reserves per worker actor.")] = None,
    capacity_factor: CapacityFactor = None,
    overflow: Overflow = None,
    batch_window_ms: BatchWindow = None,
    max_inflight_tokens: Annotated[int | None, typer.Option(help="Admission bound on tokens in flight.")] = None,
    rebalance: Annotated[
        float | None, typer.Option(help="Hot-expert replication: run the EPLB balancer every this many seconds.")
    ] = None,
    autoscale_max_workers: Annotated[int | None, typer.Option(help="Autoscale workers up to this many.")] = None,
    autoscale_min_workers: Annotated[int | None, typer.Option(help="Autoscale down to this many.")] = None,
    model_name: ModelName = None,
    dtype: Dtype = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    metrics_port: MetricsPort = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
) -> None:
    """Start router, expert workers and gateway; block until Ctrl-C or SIGTERM, then stop them all."""
    from moe_serve.stack_command import run_up

    settings = build_settings(
        UpSettings,
        checkpoint=checkpoint,
        workers=workers,
        port=port,
        ray_address=ray_address,
        worker_num_gpus=worker_num_gpus,
        worker_num_cpus=worker_num_cpus,
        capacity_factor=capacity_factor,
        overflow=overflow,
        batch_window_ms=batch_window_ms,
        max_inflight_tokens=max_inflight_tokens,
        rebalance_interval_s=rebalance,
        autoscale_max_workers=autoscale_max_workers,
        autoscale_min_workers=autoscale_min_workers,
        model_name=model_name,
        dtype=dtype,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        metrics_port=metrics_port,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
    )
    configure_logging(settings.log_level)
    run_up(settings, console)


@app.command()
def workers(
    checkpoint: CheckpointDir = None,
    router_address: Annotated[str | None, typer.Option(help="host:port of the router the workers serve.")] = None,
    count: Annotated[int | None, typer.Option("--workers", help="Expert workers (Ray actors).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to deploy on (default: a local one).")] = None,
    worker_num_gpus: Annotated[float | None, typer.Option(help="GPUs per worker actor (1 on a GPU cluster).")] = None,
    worker_num_cpus: Annotated[float | None, typer.Option(help="CPUs Ray reserves per worker actor.")] = None,
    rebalance: Annotated[float | None, typer.Option(help="Run the EPLB balancer every this many seconds.")] = None,
    autoscale_max_workers: Annotated[int | None, typer.Option(help="Autoscale workers up to this many.")] = None,
    autoscale_min_workers: Annotated[int | None, typer.Option(help="Autoscale down to this many.")] = None,
    model_name: ModelName = None,
    dtype: Dtype = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    metrics_port: MetricsPort = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
    registry_ttl: RegistryTtl = None,
) -> None:
    """Deploy the expert-worker actors of a stack on a Ray cluster (router and gateway run elsewhere)."""
    from moe_serve.stack_command import run_workers

    settings = build_settings(
        WorkersSettings,
        checkpoint=checkpoint,
        router_address=router_address,
        workers=count,
        ray_address=ray_address,
        worker_num_gpus=worker_num_gpus,
        worker_num_cpus=worker_num_cpus,
        rebalance_interval_s=rebalance,
        autoscale_max_workers=autoscale_max_workers,
        autoscale_min_workers=autoscale_min_workers,
        model_name=model_name,
        dtype=dtype,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        metrics_port=metrics_port,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        registry_ttl_s=registry_ttl,
    )
    configure_logging(settings.log_level)
    run_workers(settings, console)


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


ClusterFile = Annotated[Path, typer.Option(help="Cluster file written by `moe-serve up`.")]
ControllerName = Annotated[str | None, typer.Option(help="Controller actor name (default: from the cluster file).")]
RayAddress = Annotated[str | None, typer.Option(help="Ray cluster address (default: from the cluster file).")]


@app.command()
def scale(
    expert: Annotated[int | None, typer.Option(help="Expert to give --replicas replicas.")] = None,
    layer: Annotated[int | None, typer.Option(help="Only this MoE layer's expert (default: every layer).")] = None,
    replicas: Annotated[int | None, typer.Option(help="Replicas wanted for --expert.")] = None,
    workers: Annotated[int | None, typer.Option(help="Re-place all experts over this many workers.")] = None,
    cluster_file: ClusterFile = Path(".moe-serve/cluster.json"),
    ray_address: RayAddress = None,
    controller: ControllerName = None,
) -> None:
    """Scale the running stack: one expert's replicas, or the number of workers (never failing a request)."""
    from moe_serve.cluster_commands import connect, print_status

    if (expert is None) == (workers is None) or (expert is not None and replicas is None):
        console.print("[red]error[/red]: give either --expert E --replicas N [--layer L], or --workers N")
        raise typer.Exit(2)
    handle = _controller(connect, cluster_file, ray_address, controller)
    import ray  # after connect(), which sets up Ray's authentication mode first

    try:
        if workers is not None:
            ray.get(handle.scale_workers.remote(workers))
        else:
            ray.get(handle.scale_expert.remote(expert, replicas, layer))
    except ray.exceptions.RayTaskError as error:
        console.print(f"[red]error[/red]: {error.cause}")
        raise typer.Exit(1) from None
    print_status(Console(), ray.get(handle.status.remote()))


@app.command()
def status(
    cluster_file: ClusterFile = Path(".moe-serve/cluster.json"),
    ray_address: RayAddress = None,
    controller: ControllerName = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON (for scripts).")] = False,
) -> None:
    """Print the placement table of the running stack: workers, nodes, GPUs, experts, replicas, live load."""
    from moe_serve.cluster_commands import connect, print_status

    handle = _controller(connect, cluster_file, ray_address, controller)
    import ray  # after connect(), which sets up Ray's authentication mode first

    current = ray.get(handle.status.remote())
    if as_json:
        print(json.dumps({**current, "workers": [json.loads(w) for w in current["workers"]]}, indent=2))
    else:
        print_status(Console(), current)


def _controller(connect: Any, cluster_file: Path, ray_address: str | None, controller: str | None) -> Any:
    try:
        return connect(cluster_file, ray_address, controller)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None


@app.command()
def top(
    redis_url: Annotated[str | None, typer.Option(help="Read the live state the gateway writes to this Redis.")] = None,
    redis_prefix: Annotated[str, typer.Option(help="Key prefix in Redis.")] = "moe-serve:",
    model: Annotated[str | None, typer.Option(help="Model whose live state to show (with --redis-url).")] = None,
    gateway_admin: Annotated[
        str | None, typer.Option(help="Or ask the gateway directly: host:port of its internal (delivery) port.")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print the view once and exit.")] = False,
) -> None:
    """Live view of a running stack: latency, throughput, workers and their load, per-expert load bars."""
    from moe_serve.top import gateway_source, redis_source, render, run_top

    if (redis_url is None) == (gateway_admin is None) or (redis_url is not None and model is None):
        console.print("[red]error[/red]: give either --redis-url URL --model NAME, or --gateway-admin HOST:PORT")
        raise typer.Exit(2)
    source = gateway_source(gateway_admin) if gateway_admin else redis_source(redis_url, redis_prefix, model)
    if once:
        Console().print(render(source()))
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_top(source, Console(), interval)


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


def main() -> None:
    app()
