"""Commands that run one service: `moe-serve gateway`, `router`, `worker`."""

from __future__ import annotations

from typing import Annotated

import typer

from moe_serve.cli.commands.common import (
    AdvertiseHost,
    AuthTokensFile,
    BatchWindow,
    CapacityFactor,
    CheckpointDir,
    ClusterSecretFile,
    DeviceMemoryBudget,
    Dtype,
    EvictionPolicy,
    Host,
    HttpPort,
    InsecureInternal,
    InternalTlsCa,
    InternalTlsCert,
    InternalTlsKey,
    LogFormat,
    LogLevel,
    MaxMessageBytes,
    Metrics,
    MetricsPort,
    ModelName,
    Overflow,
    PipelineChunk,
    RedisPrefix,
    RedisUrl,
    RegistryTtl,
    ServeHttp,
    TlsCert,
    TlsClientCa,
    TlsKey,
    app,
    build_settings,
    internal_security_flags,
    public_security_flags,
    run_service,
)
from moe_serve.config import GatewaySettings, RouterSettings, WorkerSettings
from moe_serve.runtime.grpc_utils import configure_logging


@app.command(rich_help_panel="Run one service")
def gateway(
    port: Annotated[int | None, typer.Option(help="Public KServe v2 gRPC port.")] = None,
    http_port: HttpPort = None,
    http: ServeHttp = None,
    delivery_port: Annotated[int | None, typer.Option(help="Internal port for expert deliveries (0 = any).")] = None,
    router_address: Annotated[
        str | None,
        typer.Option(help="host:port of the router, or a target naming several (balanced round_robin)."),
    ] = None,
    router_streams: Annotated[
        int | None, typer.Option(help="RouteStreams to the router address (at least one per router to balance).")
    ] = None,
    embedded_router: Annotated[
        bool | None,
        typer.Option(
            "--embedded-router",
            help="Run the router inside this process (one hop fewer; needs --checkpoint). Its API (worker "
            "registry, model info) is served on --router-port.",
        ),
    ] = None,
    checkpoint: CheckpointDir = None,
    router_port: Annotated[int | None, typer.Option(help="With --embedded-router: the router's API port.")] = None,
    dtype: Dtype = None,
    prefetch: Annotated[
        bool | None,
        typer.Option("--prefetch/--no-prefetch", help="With --embedded-router: hint offloading workers."),
    ] = None,
    registry_ttl: RegistryTtl = None,
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
    pipeline_chunk_tokens: PipelineChunk = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="Most tokens in one cross-request batch.")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Deadline (s) when the client sets none.")] = None,
    allow_client_shm: Annotated[
        bool | None,
        typer.Option(
            "--allow-client-shm",
            help="Let clients on this host exchange tensors through POSIX shared memory (Triton's extension).",
        ),
    ] = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    metrics: Metrics = None,
    metrics_port: MetricsPort = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
    live_state_interval: Annotated[
        float | None, typer.Option(help="Seconds between live-state writes to Redis.")
    ] = None,
    max_message_bytes: MaxMessageBytes = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_client_ca: TlsClientCa = None,
    auth_tokens_file: AuthTokensFile = None,
    internal_tls_ca: InternalTlsCa = None,
    internal_tls_cert: InternalTlsCert = None,
    internal_tls_key: InternalTlsKey = None,
    cluster_secret_file: ClusterSecretFile = None,
    insecure_internal: InsecureInternal = None,
) -> None:
    """Run the gateway: the public KServe v2 endpoint, admission, capacity policy, combine."""
    from gateway.server import GatewayService

    settings = build_settings(
        GatewaySettings,
        port=port,
        delivery_port=delivery_port,
        router_address=router_address,
        router_streams=router_streams,
        embedded_router=embedded_router,
        checkpoint=checkpoint,
        router_port=router_port,
        dtype=dtype,
        prefetch=prefetch,
        registry_ttl_s=registry_ttl,
        model_name=model_name,
        capacity_factor=capacity_factor,
        expert_capacity=expert_capacity,
        overflow=overflow,
        max_inflight_tokens=max_inflight_tokens,
        max_request_tokens=max_request_tokens,
        max_inflight_rows_per_replica=max_inflight_rows_per_replica,
        batch_window_ms=batch_window_ms,
        pipeline_chunk_tokens=pipeline_chunk_tokens,
        max_batch_tokens=max_batch_tokens,
        request_timeout_s=request_timeout,
        allow_client_shm=allow_client_shm,
        http_port=http_port,
        http=http,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        log_format=log_format,
        metrics=metrics,
        metrics_port=metrics_port,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        live_state_interval_s=live_state_interval,
        **public_security_flags(tls_cert, tls_key, tls_client_ca, auth_tokens_file),
        max_message_bytes=max_message_bytes,
        **internal_security_flags(
            internal_tls_ca, internal_tls_cert, internal_tls_key, cluster_secret_file, insecure_internal
        ),
    )
    configure_logging(settings.log_level, settings.log_format)
    run_service(GatewayService.serve(settings), settings.event_loop)


@app.command(rich_help_panel="Run one service")
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
    prefetch: Annotated[
        bool | None,
        typer.Option("--prefetch/--no-prefetch", help="Hint offloading workers which experts come next."),
    ] = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    metrics: Metrics = None,
    metrics_port: MetricsPort = None,
    max_message_bytes: MaxMessageBytes = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
    registry_ttl: RegistryTtl = None,
    internal_tls_ca: InternalTlsCa = None,
    internal_tls_cert: InternalTlsCert = None,
    internal_tls_key: InternalTlsKey = None,
    cluster_secret_file: ClusterSecretFile = None,
    insecure_internal: InsecureInternal = None,
) -> None:
    """Run the router: gating, capacity, replica choice, fan-out to the expert workers."""
    from router_service.server import RouterService

    settings = build_settings(
        RouterSettings,
        checkpoint=checkpoint,
        port=port,
        split_min_rows=split_min_rows,
        model_name=model_name,
        dtype=dtype,
        noisy_gating_std=noisy_gating_std,
        noisy_gating_seed=noisy_gating_seed,
        prefetch=prefetch,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        log_format=log_format,
        metrics=metrics,
        metrics_port=metrics_port,
        max_message_bytes=max_message_bytes,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        registry_ttl_s=registry_ttl,
        **internal_security_flags(
            internal_tls_ca, internal_tls_cert, internal_tls_key, cluster_secret_file, insecure_internal
        ),
    )
    configure_logging(settings.log_level, settings.log_format)
    run_service(RouterService.serve(settings), settings.event_loop)


@app.command(rich_help_panel="Run one service")
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
    device_memory_budget: DeviceMemoryBudget = None,
    eviction_policy: EvictionPolicy = None,
    lfu_window: Annotated[float | None, typer.Option(help="Offloading with lfu: window of counted uses (s).")] = None,
    torch_threads: Annotated[int | None, typer.Option(help="torch intra-op threads.")] = None,
    dtype: Dtype = None,
    host: Host = None,
    advertise_host: AdvertiseHost = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    metrics: Metrics = None,
    metrics_port: MetricsPort = None,
    max_message_bytes: MaxMessageBytes = None,
    redis_url: RedisUrl = None,
    redis_prefix: RedisPrefix = None,
    registry_ttl: RegistryTtl = None,
    internal_tls_ca: InternalTlsCa = None,
    internal_tls_cert: InternalTlsCert = None,
    internal_tls_key: InternalTlsKey = None,
    cluster_secret_file: ClusterSecretFile = None,
    insecure_internal: InsecureInternal = None,
) -> None:
    """Run one expert worker process (no Ray): load its experts, serve them, register in Redis."""
    from expert_service.server import WorkerService

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
        device_memory_budget=device_memory_budget,
        eviction_policy=eviction_policy,
        lfu_window_s=lfu_window,
        torch_threads=torch_threads,
        dtype=dtype,
        host=host,
        advertise_host=advertise_host,
        log_level=log_level,
        log_format=log_format,
        metrics=metrics,
        metrics_port=metrics_port,
        max_message_bytes=max_message_bytes,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        registry_ttl_s=registry_ttl,
        **internal_security_flags(
            internal_tls_ca, internal_tls_cert, internal_tls_key, cluster_secret_file, insecure_internal
        ),
    )
    configure_logging(settings.log_level, settings.log_format)
    run_service(WorkerService.serve(settings), settings.event_loop)
