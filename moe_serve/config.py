"""Settings of every service: environment variables with the MOE_SERVE_ prefix, flags override.

One class per service (as MLServer does), validated when built so that a bad value stops the
service at start-up with a message, not inside a request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from moe_serve.hub import CheckpointNotFound, resolve_checkpoint
from moe_serve.runtime.eventloop import EventLoopName
from moe_serve.runtime.security import DEFAULT_INTERNAL_SERVER_NAME
from moe_serve_client.channel import DEFAULT_MAX_MESSAGE_BYTES  # one limit for clients and servers

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
OverflowRule = Literal["drop", "reroute", "dropless"]
EvictionPolicyName = Literal["lru", "lfu"]
DeviceName = Literal["auto", "cpu", "cuda"]
RouterPlacement = Literal["embedded", "service"]
# Prometheus /metrics ports, on by default (Triton serves metrics on 8002 beside gRPC on 8001)
GATEWAY_METRICS_PORT = 8002
ROUTER_METRICS_PORT = 8012
WORKER_METRICS_PORT = 8022
METRICS_PORT_HELP = (
    f"Prometheus /metrics port (0 = any free port; defaults: gateway and up {GATEWAY_METRICS_PORT}, router "
    f"{ROUTER_METRICS_PORT}, worker {WORKER_METRICS_PORT}); OTLP too when OTEL_EXPORTER_OTLP_ENDPOINT is set."
)
LogFormat = Literal["text", "json"]
# how a parent (`moe-serve up`) hands a child service its settings: every field as JSON, in the
# environment rather than on a command line (secrets travel in their own variables, see settings_json)
SETTINGS_JSON_ENV = "MOE_SERVE_SETTINGS_JSON"
SettingsT = TypeVar("SettingsT", bound=BaseModel)


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


# Python logging's level names; `info` reads as INFO
LogLevelName = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)]


def cli_flags(*flags: str) -> dict[str, Any]:
    """A Field's further command-line spellings (`json_schema_extra=cli_flags("--rebalance")`), beside the
    one made from its name (moe_serve.cli.commands.common.settings_options)."""
    return {"cli_flags": list(flags)}


def _local_checkpoint(value: object) -> object:
    # pydantic reports a ValueError as an invalid setting (the CLI: one line, exit code 2)
    if not isinstance(value, str | Path):
        return value
    try:
        return resolve_checkpoint(value)
    except CheckpointNotFound as error:
        raise ValueError(str(error)) from None


def _comma_separated(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


# the compute hop's ways beside gRPC bytes (moe_serve/runtime/transports.py), in order of preference;
# "shm,nixl" from a flag or MOE_SERVE_TRANSPORTS, a list from a parent's settings JSON
TransportName = Literal["shm", "nixl"]
Transports = Annotated[tuple[TransportName, ...], NoDecode, BeforeValidator(_comma_separated)]
DEFAULT_TRANSPORTS: tuple[TransportName, ...] = ("shm",)  # NIXL is opted into: it registers memory per stream


# a checkpoint directory or a Hub id `org/name[@revision]`, resolved to a local directory when the
# settings are built: every service and command sees a directory
CheckpointPath = Annotated[Path, BeforeValidator(_local_checkpoint)]


class CommonSettings(BaseSettings):
    """Settings every service has."""

    model_config = SettingsConfigDict(env_prefix="MOE_SERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 to accept remote callers).")
    advertise_host: str | None = Field(
        None,
        description="Host name other services use to reach this one (default: the bound host, "
        "or this machine's IP when bound to 0.0.0.0).",
    )
    log_level: LogLevelName = Field("INFO", description="Python logging level.")
    log_format: LogFormat = Field(
        "text", description="Log lines as text, or as one JSON object per line (for log shippers)."
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, gt=0, description="Largest gRPC message sent or received on every hop (bytes)."
    )
    redis_url: str | None = Field(
        None,
        description="Redis server holding the shared worker registry, e.g. redis://127.0.0.1:6379/0. "
        "Unset: single-host in-process registry.",
    )
    redis_prefix: str = Field("moe-serve:", description="Prefix of every Redis key and channel this deployment uses.")
    registry_ttl_s: float = Field(10.0, gt=0, description="Seconds a worker registration lives without heartbeat.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of this process.")
    shared_memory_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Each stream that carries tensors (router to worker, worker to gateway) offers an arena of this "
        "many bytes, reached as `transports` says: rows, and outputs, pass through it instead of the messages. A peer "
        "that reaches it by none declines; a batch that does not fit goes as bytes. 0 = off.",
    )
    transports: Transports = Field(
        DEFAULT_TRANSPORTS,
        description="How rows and outputs move between router, workers and gateway beside gRPC bytes, by preference "
        "(comma-separated; empty: always bytes). shm: a shared-memory arena (same host). nixl: NIXL one-sided "
        "transfers of the same arena (any host; needs the nixl package on both ends: pip install 'moe-serve[nixl]'). "
        "The sender of a stream (router, or worker delivering) offers each one it has; the receiver takes the first "
        "of its own list that reaches it.",
    )
    event_loop: EventLoopName = Field(
        "auto", description="Event loop of the service: uvloop (auto, where installed) or the standard asyncio loop."
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics at http://host:METRICS_PORT/metrics.")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (0 = any free port; each service has its own default). "
        "OTLP export is on when OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )
    cluster_secret: SecretStr | None = Field(
        None,
        description="The stack's cluster secret (environment only: MOE_SERVE_CLUSTER_SECRET, never a flag). Every "
        "internal call carries a token derived from it and registry records are signed with it; the same value "
        "on every service of a stack. `moe-serve up` makes one.",
    )
    cluster_secret_file: Path | None = Field(
        None, description="A file (mode 0600, e.g. a Compose or Kubernetes secret) holding the cluster secret."
    )
    insecure_internal: bool = Field(
        False,
        description="Debugging only: internal RPCs accept any caller and registry records are not authenticated.",
    )
    internal_tls_ca: Path | None = Field(
        None,
        description="Mutual TLS between services: the internal CA certificate (PEM). With it, internal "
        "servers accept only clients holding a certificate it signed.",
    )
    internal_tls_cert: Path | None = Field(None, description="This service's internal certificate (PEM).")
    internal_tls_key: Path | None = Field(None, description="The private key of the internal certificate (PEM).")
    internal_tls_server_name: str = Field(
        DEFAULT_INTERNAL_SERVER_NAME,
        description="Name every internal server certificate carries (checked instead of the dialed host).",
    )

    @property
    def prometheus_port(self) -> int | None:
        """The port to serve /metrics on, or None when metrics are off."""
        return self.metrics_port if self.metrics else None

    @model_validator(mode="after")
    def _check_internal_tls(self) -> CommonSettings:
        given = [self.internal_tls_ca, self.internal_tls_cert, self.internal_tls_key]
        if any(given) and not all(given):
            raise ValueError("internal TLS needs all three of internal_tls_ca, internal_tls_cert and internal_tls_key")
        return self


class PublicEndpointSettings(BaseModel):
    """Security of the public KServe port: TLS and bearer tokens."""

    tls_cert: Path | None = Field(None, description="TLS on the public port: the server certificate chain (PEM).")
    tls_key: Path | None = Field(None, description="TLS on the public port: its private key (PEM).")
    tls_client_ca: Path | None = Field(
        None, description="Require client certificates signed by this CA on the public port (mutual TLS)."
    )
    auth_tokens_file: Path | None = Field(
        None,
        description='Bearer-token auth: a JSON file {"tokens": [{"name": ..., "token": ..., '
        '"models": ["*" or names]}]}; calls need \'authorization: Bearer <token>\'.',
    )

    @model_validator(mode="after")
    def _check_public_tls(self) -> PublicEndpointSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS on the public port needs both tls_cert and tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (client certificates ride on TLS)")
        return self


class GatewayEndpointSettings(PublicEndpointSettings):
    """What a gateway serves and how it admits, batches and pipelines requests: `moe-serve gateway`'s
    settings, and `moe-serve up`'s for the gateway it starts."""

    port: int = Field(8001, ge=0, le=65535, description="Public KServe v2 gRPC port (0 = any free port).")
    http_port: int = Field(
        8000, ge=0, le=65535, description="Public KServe v2 HTTP/REST port, beside gRPC (0 = any free port)."
    )
    http: bool = Field(True, description="Serve KServe v2 HTTP/REST on http_port (false: gRPC only).")
    metrics_port: int | None = Field(GATEWAY_METRICS_PORT, ge=0, le=65535, description=METRICS_PORT_HELP)
    max_inflight_tokens: int = Field(
        65536, gt=0, description="Tokens admitted at once; more is refused with RESOURCE_EXHAUSTED instead of queueing."
    )
    max_request_tokens: int = Field(16384, gt=0, description="Largest T one request may carry.")
    max_request_bytes: int | None = Field(
        None,
        gt=0,
        description="Largest request message the public port receives; a larger one is refused (RESOURCE_EXHAUSTED) "
        "by gRPC before it is buffered. Unset: the largest admissible request, max_request_tokens x hidden size x "
        "4 bytes (FP32) plus 1 MiB of framing; never more than max_message_bytes.",
    )
    capacity_factor: float | None = Field(
        None,
        ge=0.0,
        description="Expert capacity C = ceil(factor * T * k / E) per dispatch batch. Unset: the "
        "model's own behaviour (dropless; Switch: its configured expert_capacity).",
    )
    expert_capacity: int | None = Field(
        None,
        ge=1,
        description="Absolute expert capacity (rows per expert per dispatch batch); wins over capacity_factor.",
    )
    overflow: OverflowRule | None = Field(
        None,
        description="What happens to a slot over capacity: drop (Switch/GShard), reroute (to the token's "
        "next-best expert with room) or dropless (no capacity limit).",
    )
    max_inflight_rows_per_replica: int = Field(
        32768,
        ge=0,
        description="Refuse work (RESOURCE_EXHAUSTED) that would put more rows than this in flight "
        "on one expert replica; 0 = no bound.",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0.0,
        description="Cross-request batching: concurrent requests for the same layer arriving "
        "within this window are dispatched together; 0 = off.",
    )
    max_batch_tokens: int = Field(8192, gt=0, description="Most tokens in one cross-request batch.")
    pipeline_chunk_tokens: int = Field(
        0,
        ge=0,
        description="Pipelining: a request of more than this many tokens is routed as near-equal chunks of at most "
        "this size, concurrently, so router, workers and combine overlap (dropless capacity, batching off; results "
        "stay within floating-point tolerance of the whole batch, BF16 bits may differ); 0 = off.",
    )
    load_window_s: float = Field(
        60.0,
        gt=0,
        description="Sliding window of the load-share, imbalance and drop-rate figures and the latency percentiles.",
    )
    live_state_interval_s: float = Field(
        1.0, gt=0, description="How often the live state is written to Redis (when redis_url is set)."
    )
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline applied when the client sets none.")
    readiness_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often readiness (grpc.health.v1) is re-checked against the router between probes; "
        "a probe itself always gets a fresh answer.",
    )
    startup_timeout_s: float = Field(120.0, gt=0, description="How long to wait for the router at start-up.")
    allow_client_shm: bool = Field(
        False,
        description="Triton's system shared-memory extension: clients on this host may register POSIX "
        "shared-memory objects and exchange tensors through them. Off by default, as Triton's "
        "--allow-client-shm: a registered object is read and written by the gateway.",
    )


class RouterPolicySettings(BaseModel):
    """How the router gates and fans out: `moe-serve router`'s settings, a gateway's for the router it
    embeds, and `moe-serve up`'s for its router."""

    dtype: DtypeName = Field("auto", description="Compute dtype (auto: the checkpoint's).")
    split_min_rows: int = Field(
        256,
        ge=0,
        description="An expert with several replicas and at least twice this many rows in one batch "
        "has them split over its replicas (0 = never split).",
    )
    noisy_gating_std: float = Field(
        0.0,
        ge=0.0,
        description="Noisy top-k gating (Shazeer et al. 2017) for "
        "experiments: std of the noise added to the router logits; 0 = off (inference).",
    )
    noisy_gating_seed: int = Field(0, description="Seed of the noisy-gating generator.")
    max_dispatch_attempts: int = Field(
        3, ge=1, description="Tries per expert batch across replicas before the request fails UNAVAILABLE."
    )
    prefetch: bool = Field(
        True,
        description="Hint offloading workers which experts come next (this batch's and the next layer's likely "
        "ones, learnt from consecutive layers of one sequence), so their loads overlap with compute.",
    )


class GatewaySettings(GatewayEndpointSettings, RouterPolicySettings, CommonSettings):
    """The public KServe v2 gRPC endpoint: admission, capacity policy, combine (and, with
    embedded_router, the router itself: its RouterPolicySettings fields apply to it)."""

    delivery_port: int = Field(
        0, ge=0, le=65535, description="Internal port where workers deliver expert outputs (0 = any free port)."
    )
    router_address: str = Field(
        "127.0.0.1:8010",
        description="host:port of the router service, or a gRPC target naming several routers (a headless "
        "Service's DNS name, `ipv4:10.0.0.1:8010,10.0.0.2:8010`): the gateway balances over them (round_robin).",
    )
    router_streams: int = Field(
        1,
        ge=1,
        description="RouteStreams the gateway keeps to the router address, taken in turn. Each lands on the next "
        "router of a target with several (round_robin), so several routers share the load: at least one per router.",
    )
    model_name: str | None = Field(
        None,
        description="Public model name (default: the router's: the checkpoint directory's or Hub repository's name).",
    )
    embedded_router: bool = Field(
        False,
        description="Run the router (gating, capacity, replica choice, fan-out) inside this process: no hop to a "
        "router service, and workers answer with their rows instead of delivering them (6 messages per T=1 "
        "request instead of 12). This process then serves the router's API (worker registry, model info) on "
        "router_port; the router's other settings come from MOE_SERVE_* variables as for `moe-serve router`.",
    )
    checkpoint: CheckpointPath | None = Field(
        None, description="With embedded_router: the checkpoint (router weights are read)."
    )
    router_port: int = Field(
        8010, ge=0, le=65535, description="With embedded_router: port of the router's API (0 = any free port)."
    )

    @model_validator(mode="after")
    def _check_embedded_router(self) -> GatewaySettings:
        if self.embedded_router and self.checkpoint is None:
            raise ValueError("embedded_router needs checkpoint: the router weights are read from it")
        return self


class RouterSettings(RouterPolicySettings, CommonSettings):
    """Gating, capacity, replica choice and fan-out to the expert workers."""

    port: int = Field(8010, ge=0, le=65535, description="Router gRPC port (0 = any free port).")
    metrics_port: int | None = Field(ROUTER_METRICS_PORT, ge=0, le=65535, description=METRICS_PORT_HELP)
    checkpoint: CheckpointPath = Field(
        ..., description="Checkpoint directory or Hub id org/name[@revision] (only the router weights are read)."
    )
    model_name: str | None = Field(
        None, description="Model name (default: the checkpoint directory's or Hub repository's name)."
    )


def embedded_router_settings(gateway: GatewaySettings) -> RouterSettings:
    """The router a gateway runs in its own process: the gateway's common settings (host, registry,
    security, message size), its RouterPolicySettings fields and its router_port."""
    return RouterSettings(
        **{
            **fields_of(gateway, CommonSettings, RouterPolicySettings),
            "port": gateway.router_port,
            "checkpoint": gateway.checkpoint,
            "model_name": gateway.model_name,
            "metrics_port": None,  # its metrics are served on the gateway's endpoint
        }
    )


def fields_of(settings: BaseModel, *parts: type[BaseModel]) -> dict[str, Any]:
    """The values `settings` holds for the fields of `parts` (settings classes or their mixins): how one
    service's settings become part of another's (a gateway's router, `up`'s gateway)."""
    names = {name for part in parts for name in part.model_fields}
    return {name: getattr(settings, name) for name in type(settings).model_fields if name in names}


class ExpertComputeSettings(BaseModel):
    """How a worker computes and keeps its experts: `moe-serve worker`'s settings, and those of every
    worker actor that `moe-serve up` and `moe-serve workers` start."""

    dtype: DtypeName = Field("auto", description="Compute dtype (auto: the checkpoint's).")
    device: DeviceName = Field("auto", description="auto: a GPU when one is visible.")
    compute_threads: int = Field(2, ge=1, description="Experts computed concurrently (one thread each).")
    device_memory_budget: str | None = Field(
        None,
        description="Expert offloading: bytes of experts kept on the compute device ('512MiB', '2GB') or a "
        "fraction of the owned experts ('0.25', '25%'); the rest wait in host memory. Unset: all resident.",
    )
    eviction_policy: EvictionPolicyName = Field(
        "lru", description="Offloading: which expert leaves the device first (least recently / frequently used)."
    )
    lfu_window_s: float = Field(30.0, gt=0, description="Offloading with lfu: the window uses are counted over.")


class WorkerSettings(ExpertComputeSettings, CommonSettings):
    """One expert worker: the weights of its experts and a gRPC server computing them."""

    port: int = Field(0, ge=0, le=65535, description="Worker gRPC port (0 = any free port).")
    metrics_port: int | None = Field(
        WORKER_METRICS_PORT,
        ge=0,
        le=65535,
        description=f"{METRICS_PORT_HELP} A second worker on one host needs another.",
    )
    checkpoint: CheckpointPath = Field(
        ..., description="Checkpoint directory or Hub id org/name[@revision] (only this worker's experts are read)."
    )
    experts: str | None = Field(
        None,
        description="Experts this worker serves: '0-3' (in every MoE layer) and/or '1:5' (expert 5 of layer 1). "
        "Default: its block of the placement plan (worker_index of num_workers).",
    )
    router_address: str | None = Field(
        None, description="Register (with heartbeats) in this router's registry; used when redis_url is not set."
    )
    worker_index: int = Field(0, ge=0, description="This worker's index in the placement plan.")
    num_workers: int = Field(1, ge=1, description="Workers in the placement plan.")
    worker_id: str | None = Field(None, description="Registry id (default: derived from host, port and pid).")

    @model_validator(mode="after")
    def _check_index(self) -> WorkerSettings:
        if self.worker_index >= self.num_workers:
            raise ValueError(f"worker_index {self.worker_index} must be < num_workers {self.num_workers}")
        return self


class WorkerPoolSettings(ExpertComputeSettings, CommonSettings):
    """The expert-worker actors of a stack, owned by its deployment controller on a Ray cluster; its
    ExpertComputeSettings fields apply to every worker."""

    workers: int = Field(2, ge=1, description="Expert workers (Ray actors).")
    ray_address: str | None = Field(None, description="Join this Ray cluster instead of starting a local one.")
    worker_num_gpus: float = Field(0.0, ge=0, description="GPUs per worker actor (1 on a GPU cluster).")
    worker_num_cpus: float = Field(0.0, ge=0, description="CPUs Ray reserves per worker actor.")
    model_name: str | None = Field(
        None, description="Public model name (default: the checkpoint directory's or Hub repository's name)."
    )
    rebalance_interval_s: float = Field(
        0.0,
        ge=0.0,
        description="Node-aware expert placement (placement_planner): rebalance this often (0 = off).",
        json_schema_extra=cli_flags("--rebalance"),
    )
    autoscale_max_workers: int = Field(0, ge=0, description="Autoscaling: upper bound of workers (0 = off).")
    autoscale_min_workers: int = Field(0, ge=0, description="Autoscaling: lower bound (0 = the starting count).")
    autoscale_target_queued_rows: float = Field(
        256.0, gt=0, description="Autoscaling: add a worker when queued rows per replica stay above this."
    )
    autoscale_window: int = Field(6, ge=1, description="Autoscaling: consecutive 5 s checks before acting.")
    cluster_file: Path = Field(
        Path(".moe-serve/cluster.json"),
        description="Where the Ray address and controller name are recorded, for `moe-serve scale` and `status`.",
    )


class WorkersSettings(WorkerPoolSettings):
    """`moe-serve workers`: deploy the worker actors of a stack whose router runs elsewhere."""

    checkpoint: CheckpointPath = Field(
        ...,
        description="Checkpoint directory (readable on every Ray node) or Hub id org/name[@revision] (each node "
        "resolves it from its own Hugging Face cache or the Hub).",
    )
    router_address: str = Field(..., description="host:port of the router; its registry (or Redis) gets the workers.")


class UpSettings(GatewayEndpointSettings, RouterPolicySettings, WorkerPoolSettings):
    """`moe-serve up`: the whole stack on one machine or a Ray cluster: the settings of its gateway
    (GatewayEndpointSettings), router (RouterPolicySettings) and worker actors (WorkerPoolSettings),
    and these of its own."""

    checkpoint: CheckpointPath | None = Field(
        None, description="Checkpoint directory or Hub id org/name[@revision] (default: generate the demo one)."
    )
    demo_dir: Path = Field(Path(".moe-serve/mixtral-demo"), description="Where the demo checkpoint is written.")
    router: RouterPlacement = Field(
        "embedded",
        description="embedded: the router runs inside the gateway's process (one hop and half the messages "
        "fewer; the faster on one host, measured by `moe-serve bench`); service: its own process, as in "
        "compose and Kubernetes.",
    )
    restart_limit: int = Field(
        5, ge=0, description="Restarts of a dead gateway or router within restart_window_s before `up` gives up."
    )
    restart_window_s: float = Field(300.0, gt=0, description="The window restart_limit counts restarts in.")
    stop_timeout_s: float = Field(
        12.0, gt=0, description="On SIGINT/SIGTERM, how long `up` waits for the stack to stop before it exits anyway."
    )


def is_secret(field: FieldInfo) -> bool:
    """A SecretStr field: environment only, never a flag, never in a settings JSON unless asked."""
    return field.annotation is SecretStr or SecretStr in get_args(field.annotation)


def settings_json(settings: BaseModel, *, secrets: bool = False, only_set: bool = False, **overrides: Any) -> str:
    """Every field of `settings` as JSON (what settings_from_json reads back), `overrides` replacing some;
    with `only_set`, only the fields given when it was built (by argument or environment).

    Secret fields are left out unless `secrets`: a child process gets the cluster secret in its own
    environment variable (moe_serve.cluster.launcher.secret_environment), so that the JSON can be logged."""
    values = settings.model_dump(mode="json", exclude_unset=only_set)
    for name, field in type(settings).model_fields.items():
        if is_secret(field) and name in values:
            secret = getattr(settings, name)
            if secrets and secret is not None:
                values[name] = secret.get_secret_value()
            else:
                del values[name]
    return json.dumps({**values, **overrides})


def settings_from_json(settings_class: type[SettingsT], text: str) -> SettingsT:
    """The settings settings_json wrote (validated again; a field it left out comes from MOE_SERVE_*)."""
    return settings_class(**json.loads(text))


def inherited_settings() -> dict[str, Any]:
    """The settings a parent handed this process in MOE_SERVE_SETTINGS_JSON, taken out of the
    environment so that no process this one starts inherits them; {} when none."""
    text = os.environ.pop(SETTINGS_JSON_ENV, "")
    return json.loads(text) if text else {}
