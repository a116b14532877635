"""Runs the benchmark: reference block, bare echo, monolithic KServe peer and served stack measured in
one process tree, then (sections) the Ray Serve composition, the throughput-vs-T sweep, the routing
sections and the thin-expert comparison."""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch

from expert_service.actor import ExpertWorkerActor
from moe_serve.bench.fastpath import peer_comparison, probe_fast_path
from moe_serve.bench.measure import Latency, loopback_tx_bytes, rss_mib
from moe_serve.bench.monolithic import spawn_monolithic
from moe_serve.bench.offload import offload_comparison
from moe_serve.bench.progress import SectionProgress
from moe_serve.bench.reference import reference_block, run_block
from moe_serve.bench.replication import replication_comparison
from moe_serve.bench.routing import concurrency_sweep, drop_rates
from moe_serve.bench.sweep import SWEEP_TOKENS, SweepSubject, throughput_sweep
from moe_serve.checkpoint import Checkpoint
from moe_serve.cli.demo import DemoShape, ensure_demo_checkpoint
from moe_serve.cluster.launcher import Stack, init_ray, launch_stack
from moe_serve.cluster.processes import spawn_service_process
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES, UpSettings
from moe_serve.runtime.grpc_utils import channel_options
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from moe_serve_client.requests import infer_request

if TYPE_CHECKING:  # imported lazily at run time: Ray Serve is a bench-only dependency
    from moe_serve.bench.rayserve import RayServeLayer

logger = logging.getLogger(__name__)
ECHO_PAYLOAD_BYTES = 4096
# T=1 is timed over this many distinct tokens in turn: a single repeated token would always pick
# the same two experts (and maybe the same worker), which is not what a real stream of tokens does
T1_DISTINCT_TOKENS = 64
# tokens on which the Ray Serve composition is checked against the transformers block before timing
VERIFY_TOKENS = 64


# sections that run with device cuda (auth times gRPC hops alone, on any machine; thin places its
# workers and the monolithic peer on the GPU as the core run does)
GPU_SECTIONS = frozenset({"sweep", "pipelining", "concurrency", "capacity", "auth", "thin", "transports", "placement"})
# the order run_bench runs the optional sections in (after starting the subjects and the core comparison)
SECTION_ORDER = (
    "rayserve",
    "sweep",
    "pipelining",
    "concurrency",
    "capacity",
    "thin",
    "transports",
    "placement",
    "auth",
    "replication",
    "offload",
)


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
    throughput_requests: int = 10
    # measurements alternate between reference, served and echo in this many rounds
    rounds: int = 5
    # optional sections after the core comparison
    sections: tuple[str, ...] = (
        "rayserve",
        "sweep",
        "concurrency",
        "capacity",
        "replication",
        "offload",
        "auth",
        "thin",
        "placement",
    )
    # rayserve: concurrent callers at this T, each sending this many requests over all rounds
    rayserve_tokens: int = 256
    rayserve_clients: int = 4
    rayserve_requests_per_client: int = 10
    # sweep: single-client throughput at each T (for the plots), in at most this many rounds
    sweep_tokens: tuple[int, ...] = SWEEP_TOKENS
    sweep_rounds: int = 3
    checkpoint_root: Path = Path(".moe-serve")
    output_dir: Path = Path("benchmarks/results")
    # "cuda": the workers and the in-process reference compute on the GPU (one GPU shared by the workers)
    device: str = "cpu"
    # the served stack's gateway pipelining (0 = off, the default of `moe-serve up`)
    pipeline_chunk_tokens: int = 0
    # fast path: T=1 requests whose messages and gateway stages are counted (scraped from /metrics)
    fast_path_requests: int = 100

    def __post_init__(self) -> None:
        if self.fast_path_requests < 1:
            raise ValueError(f"fast_path_requests must be at least 1, not {self.fast_path_requests}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {self.device!r}")
        unsupported = set(self.sections) - GPU_SECTIONS
        if self.device == "cuda" and unsupported:
            # those sections start stacks or deployments of their own, which place experts on the CPU
            raise ValueError(
                f"sections {', '.join(sorted(unsupported))} run on the CPU only; "
                f"with device cuda pass sections from {', '.join(sorted(GPU_SECTIONS))}"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no CUDA GPU on this machine")


@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    reference: dict[str, Any] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)
    # the monolithic KServe peer (bench.monolithic): T=1 latency and tokens/s, same client as served
    monolithic: dict[str, Any] = field(default_factory=dict)
    echo: dict[str, Any] = field(default_factory=dict)
    memory_mib: dict[str, dict[str, float]] = field(default_factory=dict)
    concurrency: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    capacity: list[dict[str, Any]] = field(default_factory=list)
    replication: dict[str, Any] = field(default_factory=dict)
    offload: dict[str, Any] = field(default_factory=dict)
    rayserve: dict[str, Any] = field(default_factory=dict)
    throughput_sweep: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # gateway pipelining: single-client tokens/s at large T, whole requests against chunked ones
    pipelining: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # device cuda only: tokens/s as TFLOP/s and as a fraction of the GPU's measured matmul peak
    gpu: dict[str, Any] = field(default_factory=dict)
    # what authenticating internal hops costs per message: cluster token against mutual TLS (bench.auth_cost)
    internal_auth: dict[str, Any] = field(default_factory=dict)
    # the compute hop's rows by shared memory, NIXL transfers and bytes, on thin experts (bench.transports)
    transports: dict[str, Any] = field(default_factory=dict)
    # expert placement policies on synthetic (and recorded) load matrices (bench.placement)
    placement: dict[str, Any] = field(default_factory=dict)
    # raw T=1 latencies (ms) per subject, for the latency CDF plot
    t1_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    # issue 22: served against the monolithic KServe peer, messages per T=1 request and where its time
    # goes, on the standard checkpoint ("standard", from the core run) and on thin experts ("thin")
    fast_path: dict[str, dict[str, Any]] = field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")), 0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": gpu,
        # one line for the README and the plot titles
        "description": f"{cpu}, {os.cpu_count()} cores, {gpu or 'no GPU'}",
    }


def bench_checkpoint(config: BenchConfig, num_layers: int = 1) -> Path:
    """The standard shape; the offload section uses two MoE layers (prefetch works across layers)."""
    shape = DemoShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_experts=config.num_experts,
        top_k=config.top_k,
        num_layers=num_layers,
        dtype=config.dtype,
    )
    name = f"bench-d{shape.hidden_size}-ff{shape.intermediate_size}-e{shape.num_experts}-k{shape.top_k}-{shape.dtype}"
    if num_layers > 1:
        name += f"-l{num_layers}"
    return ensure_demo_checkpoint(config.checkpoint_root / name, shape)


def make_request(model: str, hidden: torch.Tensor) -> kserve_pb2.ModelInferRequest:
    """The bench's request: hidden states alone (layer 0, the default output)."""
    return infer_request(model, hidden)


@dataclass
class Subject:
    """Something measured: one T=1 call and (optionally) one large call."""

    name: str
    single: Callable[[], object]
    large: Callable[[], object] | None = None
    # measured during large calls: loopback bytes minus the caller's own request/response bytes
    internal_bytes: int = 0


def measure_interleaved(subjects: list[Subject], config: BenchConfig) -> dict[str, dict[str, Any]]:
    """Time every subject in alternating rounds, so machine drift hits them all alike."""
    singles: dict[str, list[float]] = {s.name: [] for s in subjects}
    large_seconds: dict[str, float] = dict.fromkeys(singles, 0.0)
    large_calls: dict[str, int] = dict.fromkeys(singles, 0)
    for subject in subjects:  # warm-up, unmeasured
        for _ in range(10):
            subject.single()
        if subject.large is not None:
            subject.large()
        subject.internal_bytes = 0  # count only the measured calls
    per_round = max(1, config.latency_requests // config.rounds)
    large_per_round = max(1, config.throughput_requests // config.rounds)
    for _ in range(config.rounds):
        for subject in subjects:
            for _ in range(per_round):
                started = time.perf_counter()
                subject.single()
                singles[subject.name].append((time.perf_counter() - started) * 1000)
            if subject.large is None:
                continue
            for _ in range(large_per_round):
                started = time.perf_counter()
                subject.large()
                large_seconds[subject.name] += time.perf_counter() - started
                large_calls[subject.name] += 1
    return {
        s.name: {
            "t1_latency_ms": asdict(Latency.of(singles[s.name])),
            "t1_samples_ms": [round(sample, 4) for sample in singles[s.name]],
            **(
                {"tokens_per_s": config.throughput_tokens * large_calls[s.name] / large_seconds[s.name]}
                if s.large is not None
                else {}
            ),
            **(
                {"internal_wire_bytes_per_token": s.internal_bytes / (config.throughput_tokens * large_calls[s.name])}
                if s.internal_bytes
                else {}
            ),
        }
        for s in subjects
    }


REFERENCE_IMPLEMENTATIONS = ("eager", "grouped_mm")


def reference_subjects(
    blocks: dict[str, torch.nn.Module], config: BenchConfig, inputs: dict[int, torch.Tensor]
) -> list[Subject]:
    subjects = []
    for implementation, block in blocks.items():
        tokens = itertools.cycle(inputs[1].split(1))
        subjects.append(
            Subject(
                name=f"reference-{implementation}",
                single=lambda b=block, t=tokens: run_block(b, next(t)),
                large=lambda b=block: run_block(b, inputs[config.throughput_tokens]),
            )
        )
    return subjects


def echo_subject(address: str, channel: grpc.Channel) -> Subject:
    echo = channel.unary_unary("/moe_serve.bench.Echo/Echo")
    payload = os.urandom(ECHO_PAYLOAD_BYTES)
    return Subject(name="echo", single=lambda: echo(payload, timeout=10))


def kserve_subject(
    name: str,
    model_name: str,
    channel: grpc.Channel,
    config: BenchConfig,
    inputs: dict[int, torch.Tensor],
    count_internal_bytes: bool = False,
) -> Subject:
    """A KServe v2 endpoint timed with the same requests and client as every other: the served stack
    (with `count_internal_bytes`, its hops' loopback bytes) or the monolithic peer."""
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    small = itertools.cycle([make_request(model_name, token) for token in inputs[1].split(1)])
    large_request = make_request(model_name, inputs[config.throughput_tokens])
    subject = Subject(name=name, single=lambda: stub.ModelInfer(next(small), timeout=30))

    def large() -> None:
        stub.ModelInfer(large_request, timeout=120)

    def large_counting_bytes() -> None:
        before = loopback_tx_bytes()
        response = stub.ModelInfer(large_request, timeout=120)
        wire = loopback_tx_bytes() - before
        # loopback carries the client's own request/response too; the layer's hops are the rest
        subject.internal_bytes += wire - large_request.ByteSize() - response.ByteSize()

    subject.large = large_counting_bytes if count_internal_bytes else large
    return subject


def served_subject(
    stack: Stack, channel: grpc.Channel, config: BenchConfig, inputs: dict[int, torch.Tensor], name: str = "served"
) -> Subject:
    return kserve_subject(name, stack.model_name, channel, config, inputs, count_internal_bytes=True)


def stack_metrics_addresses(stack: Stack) -> list[str]:
    """The /metrics addresses of the stack's gateway, router (when it is a process of its own) and
    workers (metrics must be on); the fast-path figures add up whatever they expose."""
    services = [service for service in (stack.gateway, stack.router) if service is not None]
    addresses = [str(service.ready.get("metrics_address") or "") for service in services]
    return [*addresses, *(record.metrics_address for record in stack.workers)]


# the served stack as `moe-serve up` runs it (the router in the gateway), and with the router as
# its own process (compose, Kubernetes): each is a subject of the core run and of the thin section
SERVED_MODES = {"served": "embedded", "served-service": "service"}


def launch_bench_stack(
    config: BenchConfig, checkpoint_dir: Path, router: str = "embedded", transports: tuple[str, ...] = ("shm",)
) -> Stack:
    """`moe-serve up` for the bench, every service with a /metrics port (the fast-path figures read them);
    `transports`: how its rows reach the workers (moe_serve/runtime/transports.py)."""
    # on a GPU the workers share it: Ray gives each an equal fraction, and each computes on it
    gpus_per_worker = 1.0 / config.workers if config.device == "cuda" else 0.0
    return launch_stack(
        UpSettings(
            port=0,
            http=False,  # the bench measures gRPC; no stack of it takes the default REST port
            workers=config.workers,
            worker_num_gpus=gpus_per_worker,
            pipeline_chunk_tokens=config.pipeline_chunk_tokens,
            log_level="WARNING",
            metrics_port=0,
            router=router,
            transports=transports,
        ),
        checkpoint_dir,
        worker_actor=ExpertWorkerActor,
    )


@contextmanager
def served_stacks(
    config: BenchConfig, checkpoint_dir: Path, while_launching: Callable[[], object] = lambda: None
) -> Iterator[dict[str, tuple[Stack, grpc.Channel]]]:
    """One stack per SERVED_MODES entry, with a client channel each; those still in the dict on exit are stopped.

    The stacks are launched side by side, so that their processes' start-ups (imports, weights, Ray
    actors) overlap instead of queueing; `while_launching` runs in this thread meanwhile (the caller's
    own preparations). If a launch fails, the stacks that did start are stopped and the failure raised."""
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    running: dict[str, tuple[Stack, grpc.Channel]] = {}
    try:
        with ThreadPoolExecutor(len(SERVED_MODES), thread_name_prefix="bench-launch") as pool:
            launches = {
                name: pool.submit(launch_bench_stack, config, checkpoint_dir, router)
                for name, router in SERVED_MODES.items()
            }
            try:
                while_launching()
            finally:
                wait(launches.values())  # nothing is stopped (or raised) while a launch is still under way
                for name, launch in launches.items():
                    if launch.exception() is None:
                        stack = launch.result()
                        running[name] = (stack, grpc.insecure_channel(stack.address, options=options))
            for launch in launches.values():
                launch.result()  # the first failure, if any
        yield running
    finally:
        for stack, channel in running.values():
            channel.close()
            stack.stop()


def fast_path_section(
    measured: dict[str, dict[str, Any]],
    served: list[tuple[Subject, Stack]],
    config: BenchConfig,
    checkpoint_dir: Path,
) -> dict[str, Any]:
    """Peer ratios of each served subject, with its messages per T=1 request and hop breakdown."""
    probes = {
        subject.name: probe_fast_path(subject.single, stack_metrics_addresses(stack), config.fast_path_requests)
        for subject, stack in served
    }
    echo_p50 = measured["echo"]["t1_latency_ms"]["p50"]
    return peer_comparison(measured, [s.name for s, _ in served], echo_p50, probes, checkpoint_dir.name)


WORKER_OVERHEAD_TARGET_MIB = 400  # a worker may use its experts' weights plus this much
SERVICE_TARGET_MIB = 500  # gateway and router


def measure_memory(stack: Stack, checkpoint: Checkpoint) -> dict[str, dict[str, float]]:
    """Resident memory of every service with its target, MiB."""
    import ray

    spec = checkpoint.spec
    expert_mib = 3 * spec.hidden_size * spec.expert.intermediate_size * spec.dtype.itemsize / 2**20
    memory = {
        name: {"rss": rss_mib(process.process.pid), "target": SERVICE_TARGET_MIB}
        for name, process in (("gateway", stack.gateway), ("router", stack.router))
        if name == "gateway" or process.process is not stack.gateway.process  # embedded: one process
    }
    pids = ray.get(stack.controller.worker_pids.remote())
    for record in stack.workers:
        target = len(record.experts) * expert_mib + WORKER_OVERHEAD_TARGET_MIB
        memory[f"worker {record.worker_id}"] = {"rss": rss_mib(pids[record.worker_id]), "target": target}
    return memory


@contextmanager
def rayserve_if_asked(config: BenchConfig, checkpoint_dir: Path) -> Iterator[RayServeLayer | None]:
    """The Ray Serve composition (on the bench's Ray, shut down on exit) when its section is asked for."""
    if "rayserve" not in config.sections:
        yield None
        return
    from moe_serve.bench.rayserve import ray_serve_layer

    with ray_serve_layer(checkpoint_dir) as layer:
        yield layer


def rayserve_section(
    layer: RayServeLayer,
    stack: Stack,
    memory: dict[str, dict[str, float]],
    core_subjects: list[Subject],
    blocks: dict[str, torch.nn.Module],
    config: BenchConfig,
    inputs: dict[int, torch.Tensor],
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Served vs Ray Serve: T=1 latency and concurrent throughput, alternating; (figures, T=1 samples)."""
    from moe_serve.bench.comparison import concurrent_comparison, verify_against_reference
    from moe_serve.bench.rayserve import pack

    difference = verify_against_reference(layer, blocks["eager"], inputs[config.throughput_tokens][:VERIFY_TOKENS])
    served = next(s for s in core_subjects if s.name == "served")
    tokens = itertools.cycle([pack(token) for token in inputs[1].split(1)])
    measured = measure_interleaved(
        [
            Subject(name="served", single=served.single),
            Subject(name="rayserve", single=lambda: layer.call_packed(next(tokens))),
        ],
        config,
    )
    concurrent = concurrent_comparison(
        stack.address,
        stack.model_name,
        make_request,
        layer,
        config.hidden_size,
        inputs[1].dtype,
        config.rayserve_tokens,
        config.rayserve_clients,
        config.rayserve_requests_per_client,
        config.rounds,
    )
    figures = {
        "transport": "DeploymentHandle from the driver (no HTTP proxy)",
        "startup_s": layer.startup_s,
        "max_abs_diff_vs_reference": difference,
        # the whole layer's resident memory: Ray Serve's replicas vs our gateway, router and workers
        "rss_mib": {"rayserve": layer.rss_mib(), "served": sum(m["rss"] for m in memory.values())},
        "t1_latency_ms": {name: values["t1_latency_ms"] for name, values in measured.items()},
        "concurrent": concurrent,
    }
    samples = {
        "rayserve": measured["rayserve"]["t1_samples_ms"],
        "served-vs-rayserve": measured["served"]["t1_samples_ms"],
    }
    return figures, samples


def sweep_subjects(
    stack: Stack,
    channel: grpc.Channel,
    blocks: dict[str, torch.nn.Module],
    layer: RayServeLayer | None,
    device: torch.device,
) -> list[SweepSubject]:
    """Served, both reference implementations and (when deployed) Ray Serve, for the throughput sweep."""
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    subjects = [
        SweepSubject(
            "served",
            prepare=lambda hidden: make_request(stack.model_name, hidden),
            call=lambda request: stub.ModelInfer(request, timeout=120),
        ),
        *(
            SweepSubject(
                f"reference-{name}", prepare=lambda hidden: hidden.to(device), call=lambda h, b=block: run_block(b, h)
            )
            for name, block in blocks.items()
        ),
    ]
    if layer is not None:
        from moe_serve.bench.rayserve import pack

        subjects.append(SweepSubject("rayserve", prepare=pack, call=layer.call_packed))
    return subjects


def bench_sections(config: BenchConfig) -> list[str]:
    """The sections `run_bench(config)` runs, in order: the subjects started, the core comparison, then
    the optional sections config.sections asks for."""
    return ["start", "core", *(name for name in SECTION_ORDER if name in config.sections)]


@dataclass
class BenchRun:
    """What every section of one run reads (configuration, checkpoint, inputs) and writes (result, progress)."""

    config: BenchConfig
    progress: SectionProgress
    result: BenchResult
    checkpoint_dir: Path
    checkpoint: Checkpoint
    # inputs[1] holds the distinct single tokens the T=1 measurements cycle through
    inputs: dict[int, torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.checkpoint.spec.dtype

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)


def bench_inputs(config: BenchConfig, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Seeded hidden states: T1_DISTINCT_TOKENS single tokens (key 1) and one throughput batch."""
    generator = torch.Generator().manual_seed(0)
    return {
        1: torch.randn(T1_DISTINCT_TOKENS, config.hidden_size, generator=generator).to(dtype),
        config.throughput_tokens: torch.randn(config.throughput_tokens, config.hidden_size, generator=generator).to(
            dtype
        ),
    }


def run_bench(config: BenchConfig, progress: SectionProgress | None = None) -> BenchResult:
    """Every measurement config asks for; `progress` is told as each of bench_sections(config) starts."""
    progress = progress or SectionProgress(bench_sections(config))
    checkpoint_dir = bench_checkpoint(config)
    checkpoint = Checkpoint(checkpoint_dir)
    inputs = bench_inputs(config, checkpoint.spec.dtype)
    result = BenchResult(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, machine=machine_info()
    )
    run = BenchRun(config, progress, result, checkpoint_dir, checkpoint, inputs)
    progress.start("start")
    import ray

    # one local Ray for the core run and the thin section (both stop every stack they start): its
    # start-up and shutdown are paid once; it is gone before the other sections, as before
    init_ray(log_to_driver=False)
    try:
        measured = core_and_stack_sections(run)
        thin_if_asked(run)
    finally:
        ray.shutdown()
    standalone_sections(run)
    summarize_core(run, measured)
    if run.device.type == "cuda":
        result.gpu = gpu_section(run)
    return result


def core_and_stack_sections(run: BenchRun) -> dict[str, dict[str, Any]]:
    """Start both served stacks, the echo server and the monolithic peer (all at once); run the core
    comparison, then the sections that use the served stack; stop everything but Ray (the caller's).
    Returns the core comparison's figures."""
    config, result, checkpoint_dir, inputs = run.config, run.result, run.checkpoint_dir, run.inputs
    # every subject's processes start at once: the peers now, both stacks side by side in served_stacks
    echo = spawn_service_process("echo", [], module="moe_serve.bench.echo")
    monolithic = spawn_monolithic(checkpoint_dir, config.device)
    blocks: dict[str, torch.nn.Module] = {}

    def while_launching() -> None:
        blocks.update(
            (name, reference_block(run.checkpoint, 0, name, run.dtype).to(run.device))
            for name in REFERENCE_IMPLEMENTATIONS
        )
        echo.wait_ready()
        monolithic.wait_ready()

    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    try:
        with served_stacks(config, checkpoint_dir, while_launching) as stacks:
            (stack, served_channel), (service_stack, service_channel) = stacks["served"], stacks["served-service"]
            # the in-process reference gets its input where it computes, as a model running the block locally would
            reference_inputs = {tokens: hidden.to(run.device) for tokens, hidden in inputs.items()}
            with (
                grpc.insecure_channel(echo.address) as echo_channel,
                grpc.insecure_channel(monolithic.address, options=options) as monolithic_channel,
            ):
                served = served_subject(stack, served_channel, config, inputs)
                served_service = served_subject(service_stack, service_channel, config, inputs, name="served-service")
                subjects = [
                    *reference_subjects(blocks, config, reference_inputs),
                    served,
                    served_service,
                    kserve_subject("monolithic", stack.model_name, monolithic_channel, config, inputs),
                    echo_subject(echo.address, echo_channel),
                ]
                run.progress.start("core")
                measured = measure_interleaved(subjects, config)
                result.fast_path["standard"] = fast_path_section(
                    measured, [(served, stack), (served_service, service_stack)], config, checkpoint_dir
                )
                result.fast_path["standard"]["served_service"] = measured.pop("served-service")
                # the router as its own process: in the core comparison only, then stopped
                stacks.pop("served-service")
                service_channel.close()
                service_stack.stop()
                result.memory_mib = measure_memory(stack, run.checkpoint)
                composition_sections(run, stack, served_channel, subjects, blocks)
            served_stack_sections(run, stack)
    finally:
        monolithic.stop()
        echo.stop()
    return measured


def composition_sections(
    run: BenchRun,
    stack: Stack,
    served_channel: grpc.Channel,
    core_subjects: list[Subject],
    blocks: dict[str, torch.nn.Module],
) -> None:
    """Served vs Ray Serve, and the throughput-vs-T sweep (Ray Serve included when it is deployed)."""
    config, result = run.config, run.result
    # Ray Serve starts only now, so its controller's idle loops cannot disturb the core comparison
    with rayserve_if_asked(config, run.checkpoint_dir) as layer:
        if layer is not None:
            run.progress.start("rayserve")
            result.rayserve, samples = rayserve_section(
                layer, stack, result.memory_mib, core_subjects, blocks, config, run.inputs
            )
            result.t1_samples_ms.update(samples)
        if "sweep" in config.sections:
            run.progress.start("sweep")
            result.throughput_sweep = throughput_sweep(
                sweep_subjects(stack, served_channel, blocks, layer, run.device),
                config.hidden_size,
                run.dtype,
                min(config.rounds, config.sweep_rounds),
                config.sweep_tokens,
            )


def served_stack_sections(run: BenchRun, stack: Stack) -> None:
    """Pipelining, concurrency and capacity: the sections that load the served stack alone."""
    config, result, dtype = run.config, run.result, run.dtype
    if "pipelining" in config.sections:
        run.progress.start("pipelining")
        from moe_serve.bench.pipelining import pipelining_comparison

        result.pipelining = pipelining_comparison(
            stack, make_request, config.hidden_size, dtype, min(config.rounds, config.sweep_rounds)
        )
    if "concurrency" in config.sections:
        run.progress.start("concurrency")
        result.concurrency = concurrency_sweep(stack, make_request, config.hidden_size, dtype)
    if "capacity" in config.sections:
        run.progress.start("capacity")
        gate = Checkpoint(run.checkpoint_dir).router_weights(0).gate
        result.capacity = drop_rates(stack, make_request, gate, config.top_k)


def thin_if_asked(run: BenchRun) -> None:
    """The thin and transports sections, when config.sections asks for them: on the running Ray, with
    stacks of their own."""
    if "thin" in run.config.sections:
        run.progress.start("thin")
        from moe_serve.bench.thin import thin_section

        run.result.fast_path["thin"] = thin_section(run.config, run.inputs)
    if "transports" in run.config.sections:
        run.progress.start("transports")
        from moe_serve.bench.transports import transports_section

        run.result.transports = transports_section(run.config, run.inputs)


def standalone_sections(run: BenchRun) -> None:
    """Placement, auth, replication and offload: sections that start what they measure themselves."""
    import ray

    config, result, progress = run.config, run.result, run.progress
    if "placement" in config.sections:
        progress.start("placement")
        from moe_serve.bench.placement import placement_comparison

        result.placement = placement_comparison()
    if "auth" in config.sections:
        progress.start("auth")
        from moe_serve.bench.auth_cost import measure as measure_auth_cost

        result.internal_auth = measure_auth_cost(rounds=config.rounds)
    if {"replication", "offload"} & set(config.sections):
        init_ray(log_to_driver=False)  # a fresh local Ray: these sections start stacks of their own
        try:
            if "replication" in config.sections:
                progress.start("replication")
                result.replication = replication_comparison(run.checkpoint_dir, make_request)
            if "offload" in config.sections:
                progress.start("offload")
                result.offload = offload_comparison(bench_checkpoint(config, num_layers=2), make_request)
        finally:
            ray.shutdown()


def summarize_core(run: BenchRun, measured: dict[str, dict[str, Any]]) -> None:
    """The core comparison's figures into the result: samples, served, peers, references and ratios."""
    result = run.result
    result.t1_samples_ms.update({name: values.pop("t1_samples_ms") for name, values in measured.items()})
    result.served = measured.pop("served")
    result.monolithic = measured.pop("monolithic")
    result.echo = {"payload_bytes": ECHO_PAYLOAD_BYTES, "latency_ms": measured.pop("echo")["t1_latency_ms"]}
    result.reference = {name.removeprefix("reference-"): values for name, values in measured.items()}
    result.reference["best_throughput"] = max(
        REFERENCE_IMPLEMENTATIONS, key=lambda name: result.reference[name]["tokens_per_s"]
    )
    result.reference["best_t1"] = min(
        REFERENCE_IMPLEMENTATIONS, key=lambda name: result.reference[name]["t1_latency_ms"]["p50"]
    )
    result.ratios = compute_ratios(result, run.config, run.checkpoint)


def gpu_section(run: BenchRun) -> dict[str, Any]:
    """Served throughput against the best reference and the device's matmul peak, with the curves."""
    from moe_serve.bench.gpu import gpu_figures, matmul_peak_tflops

    result, device, dtype = run.result, run.device, run.dtype
    best = result.reference[result.reference["best_throughput"]]["tokens_per_s"]
    peak = matmul_peak_tflops(dtype, device)
    name = torch.cuda.get_device_name(device)
    curves = {**result.throughput_sweep, **{f"pipelining, {k}": v for k, v in result.pipelining.items()}}
    return gpu_figures(result.served["tokens_per_s"], best, curves, run.config, peak, name, dtype)


def compute_ratios(result: BenchResult, config: BenchConfig, checkpoint: Checkpoint) -> dict[str, float]:
    reference = result.reference
    best = reference[reference["best_throughput"]]
    fastest_t1 = reference[reference["best_t1"]]["t1_latency_ms"]["p50"]
    echo_p50 = result.echo["latency_ms"]["p50"]
    hop_cost = result.served["t1_latency_ms"]["p50"] - fastest_t1
    itemsize = checkpoint.spec.dtype.itemsize
    ideal_bytes = (1 + 2 * config.top_k) * config.hidden_size * itemsize
    ratios = {
        "throughput_served_over_reference": result.served["tokens_per_s"] / best["tokens_per_s"],
        "t1_hop_cost_ms": hop_cost,
        "t1_hop_cost_in_echoes": hop_cost / echo_p50,
        "wire_bytes_over_ideal": result.served["internal_wire_bytes_per_token"] / ideal_bytes,
    }
    for key, value in result.fast_path.get("standard", {}).get("ratios", {}).get("served", {}).items():
        ratios[f"served_{key}"] = value
    if result.rayserve:
        concurrent, t1 = result.rayserve["concurrent"], result.rayserve["t1_latency_ms"]
        # targets: >= 1.5 and <= 0.5
        ratios["concurrent_throughput_served_over_rayserve"] = (
            concurrent["served"]["tokens_per_s"] / concurrent["rayserve"]["tokens_per_s"]
        )
        ratios["t1_p50_served_over_rayserve"] = t1["served"]["p50"] / t1["rayserve"]["p50"]
    return ratios


def write_result(result: BenchResult, output_dir: Path) -> list[Path]:
    """The JSON (time-stamped and latest.json) and the latest plots; returns the paths written."""
    from moe_serve.bench.plots import write_plots

    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = output_dir / f"bench-{stamp}.json"
    data = asdict(result)
    text = json.dumps(data, indent=2)
    path.write_text(text)
    (output_dir / "latest.json").write_text(text)
    # stable names, so the README can embed the newest plots; older results replot with --plot-only
    return [path, *write_plots(data, output_dir, "latest")]
