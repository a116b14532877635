"""`moe-serve soak`: a stack under mixed load for a long time, checked for leaks and wrong answers.

Starts the real topology (router and gateway processes, expert workers as Ray actors) on a
checkpoint, runs `soak_load`'s mixed load for the duration, checks every OK answer against
transformers' MoE block, and samples every service process's resident memory, open file
descriptors and threads. After the warm-up, growth must stay within the limits below; the
gateway's admission and dispatch counters must be back at zero once the load stops.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expert_service.actor import ExpertWorkerActor
from moe_serve.bench.progress import SectionProgress
from moe_serve.bench.reference import reference_layers
from moe_serve.bench.resources import ResourceSampler, growth_after
from moe_serve.bench.soak_load import LoadMix, LoadTally, Target, run_load
from moe_serve.checkpoint import Checkpoint
from moe_serve.cli.demo import ensure_demo_checkpoint
from moe_serve.cluster.launcher import Stack, init_ray, launch_stack
from moe_serve.config import UpSettings
from moe_serve.runtime.security import ClusterCredentials, open_channel

logger = logging.getLogger(__name__)

RSS_GROWTH_LIMIT_PCT = 5.0
# what run_soak does, in order ("load" lasts the soak's duration)
SOAK_SECTIONS = ("start", "load", "settle", "stop")
# A leak costs one fd or thread per request (or per failed request) and a soak sends thousands, so
# a leak shows as hundreds; a handful is what a healthy process varies by: gRPC re-dials a channel
# after an idle or keepalive timeout (a socket and its eventfd), Ray's core worker opens short-lived
# connections (metrics export, GCS pubsub), and lazily grown pools (asyncio's default executor,
# gRPC's polling threads) reach their bound only at a rare concurrency peak, and stay bounded.
FD_GROWTH_TOLERANCE = 4
THREAD_GROWTH_TOLERANCE = 2
LEAK_FIELDS = ("inflight_requests", "inflight_tokens", "pending_dispatches", "batched_requests", "running_batches")
SETTLE_S = 10.0  # after the load stops, the gateway's counters must be back at zero within this


@dataclass
class SoakConfig:
    """A soak run: `duration_s` of load; growth is measured after `warmup_fraction` of it."""

    duration_s: float = 600.0
    checkpoint: Path | None = None  # None: the demo checkpoint (written to demo_dir if missing)
    demo_dir: Path = Path(".moe-serve/mixtral-demo")
    workers: int = 2
    clients: int = 4
    warmup_fraction: float = 0.2
    sample_interval_s: float | None = None  # None: duration/100, within 0.5..5 s
    seed: int = 0
    mix: LoadMix = field(default_factory=LoadMix)

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.workers < 1 or self.clients < 1:
            raise ValueError(f"workers and clients must be >= 1, got {self.workers} and {self.clients}")

    @property
    def interval_s(self) -> float:
        if self.sample_interval_s is not None:
            return self.sample_interval_s
        return min(5.0, max(0.5, self.duration_s / 100))

    @property
    def warmup_s(self) -> float:
        return self.duration_s * self.warmup_fraction


@dataclass
class SoakResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    started_at: str
    checkpoint: str
    model_name: str
    load: str
    faults: str
    elapsed_s: float = 0.0
    requests: dict[str, Any] = field(default_factory=dict)
    requests_per_s: float = 0.0
    # per service: pid, growth after warm-up (resources.Growth), lost (exited), raw samples
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateway_counters_after: dict[str, int] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def describe_load(config: SoakConfig, layers: list[int]) -> str:
    mix = config.mix
    return (
        f"{config.clients} clients back to back for {config.duration_s:g} s, T=1-{mix.max_tokens} (log-uniform), "
        f"MoE layers {', '.join(map(str, layers))}, {mix.logits_share:.0%} asking router_logits; "
        f"{config.workers} workers"
    )


def describe_faults(config: SoakConfig) -> str:
    mix = config.mix
    return (
        f"{mix.deadline_share:.0%} of requests with {mix.deadline_ms[0]:g}-{mix.deadline_ms[1]:g} ms deadlines, "
        f"{mix.cancel_share:.0%} cancelled {mix.cancel_after_ms[0]:g}-{mix.cancel_after_ms[1]:g} ms after sending"
    )


def service_pids(stack: Stack) -> dict[str, int]:
    """Process id of the gateway, the router and each worker actor."""
    import ray

    pids = {"gateway": stack.gateway.process.pid, "router": stack.router.process.pid}
    workers = ray.get(stack.controller.worker_pids.remote())
    pids.update({f"worker {worker_id}": pid for worker_id, pid in sorted(workers.items())})
    return pids


def gateway_counters(stack: Stack, credentials: ClusterCredentials) -> dict[str, int]:
    """The gateway's leak counters (GatewayAdmin.GetStats on its internal port)."""
    from moe_serve.protos import moe_serve_pb2 as moe_pb2
    from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc

    with open_channel(str(stack.gateway.ready["delivery_address"]), [], credentials) as channel:
        stats = moe_grpc.GatewayAdminStub(channel).GetStats(moe_pb2.GatewayStatsRequest(), timeout=10)
    return {name: int(getattr(stats, name)) for name in LEAK_FIELDS}


def settled_counters(stack: Stack, credentials: ClusterCredentials) -> dict[str, int]:
    """The counters once all zero, or as they stand after SETTLE_S (work abandoned by a cancelled
    or expired request may take a moment to unwind at the gateway)."""
    deadline = time.monotonic() + SETTLE_S
    counters = gateway_counters(stack, credentials)
    while any(counters.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        counters = gateway_counters(stack, credentials)
    return counters


def evaluate(result: SoakResult) -> list[str]:
    """Every limit the run exceeded, in words (empty: passed)."""
    violations = []
    requests = result.requests
    if requests["wrong_answers"]:
        violations.append(f"{requests['wrong_answers']} wrong answers")
    if requests["unexpected_failures"]:
        violations.append(f"unexpected failures: {requests['unexpected_failures']}")
    if not requests["ok"]:
        violations.append("no request succeeded")
    for name, service in result.services.items():
        growth = service["growth"]
        if service["lost"]:
            violations.append(f"{name} could not be sampled any more ({service['lost']})")
        if growth is None:
            violations.append(f"{name}: too few samples after the warm-up")
            continue
        if growth["rss_growth_pct"] > RSS_GROWTH_LIMIT_PCT:
            violations.append(f"{name}: RSS grew {growth['rss_growth_pct']:.1f}% (limit {RSS_GROWTH_LIMIT_PCT:g}%)")
        if growth["fd_growth"] > FD_GROWTH_TOLERANCE:
            violations.append(f"{name}: {growth['fd_growth']:g} more open fds (tolerance {FD_GROWTH_TOLERANCE})")
        if growth["thread_growth"] > THREAD_GROWTH_TOLERANCE:
            violations.append(f"{name}: {growth['thread_growth']:g} more threads (tolerance {THREAD_GROWTH_TOLERANCE})")
    leaked = {name: value for name, value in result.gateway_counters_after.items() if value}
    if leaked:
        violations.append(f"gateway counters not back at zero {SETTLE_S:g} s after the load: {leaked}")
    return violations


def run_soak(
    config: SoakConfig, progress: Callable[[str], None] = logger.info, sections: SectionProgress | None = None
) -> SoakResult:
    """Start a stack (on the Ray already initialised, else a local one, shut down after), soak it,
    stop it; returns the figures with `violations` filled in. `progress` gets messages, `sections` is
    told as each of SOAK_SECTIONS starts."""
    import ray

    sections = sections or SectionProgress(SOAK_SECTIONS)

    from moe_serve.bench.runner import machine_info

    checkpoint_dir = config.checkpoint if config.checkpoint is not None else ensure_demo_checkpoint(config.demo_dir)
    checkpoint = Checkpoint(checkpoint_dir)
    spec = checkpoint.spec
    layers = list(spec.moe_layers)
    result = SoakResult(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        machine=machine_info(),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        checkpoint=str(checkpoint_dir),
        model_name="",
        load=describe_load(config, layers),
        faults=describe_faults(config),
        limits={
            "rss_growth_pct": RSS_GROWTH_LIMIT_PCT,
            "fd_growth": FD_GROWTH_TOLERANCE,
            "thread_growth": THREAD_GROWTH_TOLERANCE,
        },
    )
    references = reference_layers(checkpoint, spec.dtype)
    settings = UpSettings(port=0, http=False, metrics=False, workers=config.workers, log_level="WARNING")
    owns_ray = not ray.is_initialized()
    if owns_ray:
        init_ray(log_to_driver=False)
    try:
        sections.start("start")
        progress(f"starting the stack on {checkpoint_dir}")
        stack = launch_stack(settings, checkpoint_dir, worker_actor=ExpertWorkerActor)
        try:
            result.model_name = stack.model_name
            target = Target(stack.address, stack.model_name, spec.hidden_size, spec.dtype, references)
            sections.start("load")
            sampler, tally = soak_stack(stack, target, config, result, progress)
            sections.start("settle")
            result.gateway_counters_after = settled_counters(stack, stack.credentials)
        finally:
            sections.start("stop")
            stack.stop()
    finally:
        if owns_ray:
            ray.shutdown()
    result.requests = tally.as_dict()
    result.requests_per_s = round(sum(sum(c.values()) for c in tally.outcomes.values()) / result.elapsed_s, 2)
    for name, service in sampler.services.items():
        growth = growth_after(service.samples, config.warmup_s)
        result.services[name] = {
            "pid": service.pid,
            "growth": None if growth is None else growth.as_dict(),
            "lost": service.lost,
            "samples": [asdict(sample) for sample in service.samples],
        }
    result.violations = evaluate(result)
    return result


def soak_stack(
    stack: Stack, target: Target, config: SoakConfig, result: SoakResult, progress: Callable[[str], None]
) -> tuple[ResourceSampler, LoadTally]:
    """The load on a running stack, its services sampled meanwhile; sets `result.elapsed_s`."""
    pids = service_pids(stack)
    sampler = ResourceSampler(pids, config.interval_s)
    progress(f"soaking for {config.duration_s:g} s with {config.clients} clients; services {pids}")
    started = time.monotonic()
    sampler.start()
    try:
        tally = run_load(target, config.mix, config.clients, config.duration_s, config.seed)
    finally:
        sampler.stop()
    result.elapsed_s = round(time.monotonic() - started, 3)
    return sampler, tally


def write_soak_result(result: SoakResult, output_dir: Path) -> list[Path]:
    """`<output_dir>/<timestamp>.json` and `latest.json`; returns both paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.as_dict(), indent=2) + "\n"
    path = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(text)
    latest = output_dir / "latest.json"
    latest.write_text(text)
    return [path, latest]


def max_growth(result: SoakResult) -> dict[str, float]:
    """The largest RSS (%), fd and thread growth over all services (for one-line summaries)."""
    growths = [s["growth"] for s in result.services.values() if s["growth"] is not None]
    return {
        "max_rss_growth_pct": max((g["rss_growth_pct"] for g in growths), default=float("nan")),
        "max_fd_growth": max((g["fd_growth"] for g in growths), default=float("nan")),
        "max_thread_growth": max((g["thread_growth"] for g in growths), default=float("nan")),
    }
