"""The comparison point: the same MoE layer composed as Ray Serve deployments, called through handles.

One deployment per expert holds only that expert's weights and runs the workers' FFN
(`expert_service.experts.expert_forward`); one ingress deployment gates with `moe_serve.layer.gating`,
groups rows per expert with `moe_serve.layer.dispatch`, calls the experts concurrently and combines with
`moe_serve.layer.combine` - the math of our router and gateway - so the two differ only in transport and
orchestration. The driver calls the ingress through a DeploymentHandle, not HTTP: handles are
Ray Serve's own fastest path, so Ray Serve is not charged for an HTTP proxy hop.

Resources match the served stack's: every replica asks Ray for 0 CPUs (as our worker actors do,
so all fit on 2 cores), computes with one torch thread (our workers' default) and gets the same
malloc tuning as our services. Tensors travel as uint8 views, which Ray's pickle-5 serialiser
passes out of band without a copy (and which carry bfloat16, which numpy cannot).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

# the workers' own FFN, so both sides compute the identical expert
from expert_service.experts import expert_forward
from moe_serve.bench.measure import rss_mib
from moe_serve.checkpoint import Checkpoint, ExpertWeights
from moe_serve.layer.combine import CombineBuffer
from moe_serve.layer.dispatch import group_by_expert, token_indices
from moe_serve.layer.gating import compute_gating
from moe_serve.runtime import codec
from moe_serve.runtime.allocator import tune_allocator

APP_NAME = "moe-bench-rayserve"
REPLICA_OPTIONS = {"ray_actor_options": {"num_cpus": 0}}
# no per-request access log: our services log no line per request either, and Ray Serve's
# production guidance turns it off for throughput
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}

# a tensor on the wire: raw bytes as a uint8 array, KServe datatype name, shape
Packed = tuple[np.ndarray, str, tuple[int, ...]]


def pack(tensor: torch.Tensor) -> Packed:
    tensor = tensor.contiguous()
    return tensor.view(-1).view(torch.uint8).numpy(), codec.datatype_name(tensor.dtype), tuple(tensor.shape)


def unpack(packed: Packed) -> torch.Tensor:
    data, datatype, shape = packed
    with warnings.catch_warnings():
        # arrays out of Ray's object store are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(data)
    return raw.view(codec.torch_dtype(datatype)).reshape(shape)


def _start_replica(torch_threads: int) -> None:
    tune_allocator()
    torch.set_num_threads(torch_threads)


@serve.deployment(**REPLICA_OPTIONS)
class ExpertDeployment:
    """One expert of one layer: rows [n, d] -> expert output [n, d], unscaled."""

    def __init__(self, checkpoint_dir: str, layer: int, expert: int, torch_threads: int = 1) -> None:
        _start_replica(torch_threads)
        checkpoint = Checkpoint(checkpoint_dir)
        raw, dtype = checkpoint.expert_weights(layer, expert), checkpoint.spec.dtype
        self.weights = ExpertWeights(
            kind=raw.kind,
            up=raw.up.to(dtype).contiguous(),
            down=raw.down.to(dtype).contiguous(),
            activation=raw.activation,
        )
        checkpoint.close()

    def pid(self) -> int:
        return os.getpid()

    def __call__(self, rows: Packed) -> Packed:
        with torch.inference_mode():
            return pack(expert_forward(self.weights, unpack(rows)))


@serve.deployment(**REPLICA_OPTIONS)
class IngressDeployment:
    """Gating, dispatch to the expert deployments, combine: hidden [T, d] -> layer output [T, d]."""

    def __init__(
        self, checkpoint_dir: str, layer: int, experts: list[DeploymentHandle], torch_threads: int = 1
    ) -> None:
        _start_replica(torch_threads)
        checkpoint = Checkpoint(checkpoint_dir)
        self.spec = checkpoint.spec
        if self.spec.num_shared_slots:
            raise ValueError("the Ray Serve composition covers routed experts only (no shared expert)")
        self.router = checkpoint.router_weights(layer)
        checkpoint.close()
        self.experts = experts

    async def pids(self) -> list[int]:
        """Process ids of this replica and every expert replica (for resident memory)."""
        return [os.getpid(), *await asyncio.gather(*(expert.pid.remote() for expert in self.experts))]

    async def __call__(self, packed: Packed) -> Packed:
        hidden = unpack(packed)
        spec, top_k = self.spec, self.spec.top_k
        gating = compute_gating(hidden, self.router, spec.routing)
        kept = torch.ones_like(gating.expert_ids, dtype=torch.bool)  # dropless, as the model and our default
        groups = group_by_expert(gating.expert_ids, kept, spec.num_experts)
        active = groups.active_experts()
        segments = [groups.segment(expert) for expert in active]
        replies = await asyncio.gather(
            *(
                self.experts[expert].remote(pack(hidden[token_indices(positions, top_k)]))
                for expert, positions in zip(active, segments, strict=True)
            )
        )
        buffer = CombineBuffer(hidden.shape[0], top_k, spec.hidden_size, hidden.dtype)
        for positions, reply in zip(segments, replies, strict=True):
            buffer.add(positions, unpack(reply))
        in_activation_dtype = spec.routing.weights_in_activation_dtype
        return pack(buffer.combine(gating.expert_weights, weights_in_activation_dtype=in_activation_dtype))


class RayServeLayer:
    """The deployed composition as a callable: hidden [T, d] -> output [T, d], through the ingress handle."""

    def __init__(self, handle: DeploymentHandle, startup_s: float) -> None:
        self.handle = handle
        self.startup_s = startup_s  # from serve.start to every replica ready

    def call_packed(self, packed: Packed, timeout_s: float = 120.0) -> Packed:
        return self.handle.remote(packed).result(timeout_s=timeout_s)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return unpack(self.call_packed(pack(hidden)))

    def rss_mib(self) -> float:
        """Resident memory of the ingress and expert replicas together, MiB (this machine's processes)."""
        return sum(rss_mib(pid) for pid in self.handle.pids.remote().result(timeout_s=30))


@contextmanager
def ray_serve_layer(checkpoint_dir: Path, layer: int = 0, torch_threads: int = 1) -> Iterator[RayServeLayer]:
    """Deploy the composition on the Ray this process is connected to; shut Serve down on exit.

    No HTTP proxy is started (`proxy_location="Disabled"`): the driver uses handles only.
    """
    checkpoint = Checkpoint(checkpoint_dir)
    num_experts = checkpoint.spec.num_experts
    checkpoint.close()
    started = time.perf_counter()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(proxy_location="Disabled", logging_config=SERVE_LOGGING)
    try:
        experts = [
            ExpertDeployment.options(name=f"expert-{expert}").bind(str(checkpoint_dir), layer, expert, torch_threads)
            for expert in range(num_experts)
        ]
        ingress = IngressDeployment.options(name="ingress").bind(str(checkpoint_dir), layer, experts, torch_threads)
        handle = serve.run(ingress, name=APP_NAME, route_prefix=None, logging_config=SERVE_LOGGING)
        yield RayServeLayer(handle, time.perf_counter() - started)
    finally:
        # releases the controller and every replica, so nothing holds CPUs or memory afterwards
        serve.shutdown()
