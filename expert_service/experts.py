"""The experts one worker owns: their weights in a host tier and a device tier, and the FFN.

Without a device memory budget every owned expert is materialised once, at start, in the compute
dtype on the compute device (the device tier is unbounded and never evicts). With a budget
(offloading), the host tier keeps every owned expert as read from the checkpoint (pinned and in
the compute dtype where a GPU exists), and the device tier (expert_service/offload.py) holds the
experts in use and the most useful others within the budget. Either way an expert computes from
the same materialised weights, so results are identical.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from expert_service.offload import POLICIES, DeviceTier, parse_budget
from moe_serve.checkpoint import Checkpoint, ExpertWeights
from moe_serve.cluster.placement import ExpertKey
from moe_serve.runtime.errors import ConfigurationError, InvalidInput

logger = logging.getLogger(__name__)

# transformers' ACT2FN equivalents for the activations config files name
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def expert_forward(weights: ExpertWeights, rows: torch.Tensor) -> torch.Tensor:
    """One expert on rows [n, d] -> [n, d], unscaled: the same operations, in the same order and dtype,
    as transformers' experts (fused gate/up projection for SwiGLU, wo(act(wi x)) for dense)."""
    activation = ACTIVATIONS[weights.activation]
    if weights.kind == "swiglu":
        gate, up = F.linear(rows, weights.up).chunk(2, dim=-1)
        return F.linear(activation(gate) * up, weights.down)
    return F.linear(activation(F.linear(rows, weights.up)), weights.down)


def materialise(raw: ExpertWeights, dtype: torch.dtype, device: torch.device, owned: bool = False) -> ExpertWeights:
    """A compute-ready expert: compute dtype, compute device, contiguous, its own memory.

    `owned`: nobody else holds `raw` (fresh from the checkpoint), so tensors already in the right
    dtype and device are kept as they are instead of copied once more (a host-tier copy is shared).
    """
    non_blocking = device.type == "cuda" and raw.up.is_pinned()

    def ready(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype, copy=not owned, non_blocking=non_blocking).contiguous()

    return ExpertWeights(kind=raw.kind, up=ready(raw.up), down=ready(raw.down), activation=raw.activation)


class HostTier:
    """Every owned expert in host memory, read from the checkpoint on first use and kept.

    Where the compute device is a GPU the host copies are in the compute dtype and pinned, so the
    copy to the device runs asynchronously; on a CPU they are the checkpoint's tensors as read.
    """

    def __init__(self, checkpoint_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.checkpoint_dir, self.dtype, self.device = checkpoint_dir, dtype, device
        self._checkpoint: Checkpoint | None = None
        self._weights: dict[ExpertKey, ExpertWeights] = {}
        self._lock = threading.Lock()  # safetensors handles are not shared across threads

    def get(self, key: ExpertKey) -> ExpertWeights:
        with self._lock:
            weights = self._weights.get(key)
            if weights is None:
                if self._checkpoint is None:
                    self._checkpoint = Checkpoint(self.checkpoint_dir)
                weights = self._checkpoint.expert_weights(key.layer, key.expert)
                if self.device.type == "cuda":
                    weights = ExpertWeights(
                        weights.kind,
                        weights.up.to(self.dtype).pin_memory(),
                        weights.down.to(self.dtype).pin_memory(),
                        weights.activation,
                    )
                self._weights[key] = weights
            return weights

    def drop(self, keys: Iterable[ExpertKey]) -> None:
        with self._lock:
            for key in keys:
                self._weights.pop(key, None)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(weights.nbytes for weights in self._weights.values())

    def close(self) -> None:
        with self._lock:
            if self._checkpoint is not None:
                self._checkpoint.close()


class ExpertStore:
    """The experts this worker owns, ready to compute.

    Experts can be added and removed while serving (replicas moved by the balancer or the scale
    command); removal happens only once no row of that expert is in flight.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        keys: list[ExpertKey],
        dtype: torch.dtype,
        device: torch.device,
        device_memory_budget: str | None = None,
        eviction_policy: str = "lru",
        lfu_window_s: float = 30.0,
    ) -> None:
        self.dtype, self.device, self.spec = dtype, device, checkpoint.spec
        self.hidden_size = checkpoint.spec.hidden_size
        self._owned: set[ExpertKey] = set(keys)
        owned_bytes = sum(self.expert_nbytes(key) for key in keys)
        try:
            budget = parse_budget(device_memory_budget, owned_bytes)
        except ValueError as error:
            raise ConfigurationError(str(error)) from None
        self.offloading = budget is not None
        largest = max((self.expert_nbytes(key) for key in keys), default=0)
        if budget is not None and budget < largest:
            raise ConfigurationError(
                f"device memory budget {budget} bytes cannot hold one expert ({largest} bytes in {dtype}); "
                f"give at least {largest} bytes or {largest / max(owned_bytes, 1):.2f} of the owned experts"
            )
        self.host = HostTier(checkpoint.directory, dtype, device)
        self.tier = DeviceTier(budget, self._load, self.expert_nbytes, POLICIES[eviction_policy](lfu_window_s))
        # loads ahead of use (a batch's later experts, the router's hints) overlap with compute here
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")
        if not self.offloading:
            self.tier.insert(self.read(checkpoint, keys))
        logger.info(
            "%d expert(s), %.1f MiB in %s on %s%s",
            len(keys),
            owned_bytes / 2**20,
            dtype,
            device,
            f"; offloading: device budget {budget / 2**20:.1f} MiB, {eviction_policy} eviction" if budget else "",
        )

    def expert_nbytes(self, key: ExpertKey) -> int:
        """Bytes of one expert's weights in the compute dtype."""
        shape = self.spec.expert_shape(key.expert)
        width = shape.intermediate_size * (2 if shape.kind == "swiglu" else 1)
        return (width + shape.intermediate_size) * self.hidden_size * self.dtype.itemsize

    def _load(self, key: ExpertKey) -> ExpertWeights:
        weights = materialise(self.host.get(key), self.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the copy is complete before anyone computes
        return weights

    def read(self, checkpoint: Checkpoint, keys: Iterable[ExpertKey]) -> dict[ExpertKey, ExpertWeights]:
        """Read `keys` from the checkpoint into the compute dtype and device (blocking I/O)."""
        return {
            key: materialise(checkpoint.expert_weights(key.layer, key.expert), self.dtype, self.device, owned=True)
            for key in keys
        }

    def load(self, keys: list[ExpertKey]) -> None:
        """Own `keys` from now on (blocking: called off the event loop). Resident mode reads them now;
        offloading reads them on first use."""
        if not self.offloading:
            checkpoint = Checkpoint(self.host.checkpoint_dir)
            try:
                self.tier.insert(self.read(checkpoint, keys))
            finally:
                checkpoint.close()
        self._owned.update(keys)

    def remove(self, keys: list[ExpertKey]) -> None:
        self._owned.difference_update(keys)
        self.tier.discard(keys)
        self.host.drop(keys)

    @property
    def keys(self) -> list[ExpertKey]:
        return sorted(self._owned)

    @property
    def nbytes(self) -> int:
        """Bytes of experts in the device tier (in resident mode: all of them)."""
        return self.tier.used_bytes

    def owns(self, key: ExpertKey) -> bool:
        return key in self._owned

    @contextmanager
    def batch(self, keys: list[ExpertKey]) -> Iterator[None]:
        """Around one batch: with offloading, its missing experts start loading at once."""
        if not self.offloading:
            yield
            return
        with self.tier.batch(keys, self._start_load):
            yield

    def prefetch(self, keys: Iterable[ExpertKey]) -> int:
        """Start loading owned experts the router expects next; returns how many loads started."""
        if not self.offloading:
            return 0
        return self.tier.prefetch([key for key in keys if key in self._owned], self._start_load)

    def _start_load(self, load: Callable[[], None]) -> None:
        self._loader.submit(load)

    def compute(self, key: ExpertKey, rows: torch.Tensor) -> torch.Tensor:
        """Expert `key` on rows [n, d] -> [n, d] on the CPU, unscaled by any routing weight."""
        if key not in self._owned:
            raise InvalidInput(f"this worker does not hold expert {key.expert} of layer {key.layer}")
        with self.tier.use(key) as weights, torch.inference_mode():
            outputs = expert_forward(weights, rows.to(self.device, non_blocking=True))
            return outputs if outputs.device.type == "cpu" else outputs.cpu()

    def offload_state(self) -> dict[str, Any]:
        """The registry's view of the device tier (empty without offloading)."""
        if not self.offloading:
            return {}
        stats, resident = self.tier.stats, self.tier.resident()
        return {
            "budget_bytes": self.tier.budget_bytes,
            "resident_bytes": sum(self.expert_nbytes(key) for key in resident),
            "resident": [[key.layer, key.expert] for key in resident],
            "hits": stats.hits,
            "misses": stats.misses,
            "bytes_moved": stats.bytes_moved,
            "load_seconds": stats.load_seconds,
            "evictions": stats.evictions,
            "prefetched": stats.loads["hint"],
            "unused_prefetches": stats.unused_prefetches,
            "peak_bytes": self.tier.peak_bytes,
        }

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self.host.close()
