"""The experts one worker owns: their weights, in the compute dtype on the compute device, and the FFN."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_serve.checkpoint import Checkpoint, ExpertWeights
from moe_serve.errors import InvalidInput
from moe_serve.placement import ExpertKey

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


class ExpertStore:
    """Weights of this worker's experts in the compute dtype on the compute device.

    Experts can be added and removed while serving (replicas moved by the balancer or the scale
    command); the dictionary is only changed from the event-loop thread, and removal happens only
    once no row of that expert is in flight.
    """

    def __init__(self, checkpoint: Checkpoint, keys: list[ExpertKey], dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.hidden_size = checkpoint.spec.hidden_size
        self._weights: dict[ExpertKey, ExpertWeights] = {}
        self._weights.update(self.read(checkpoint, keys))
        logger.info("loaded %d expert(s), %.1f MiB, %s on %s", len(keys), self.nbytes / 2**20, dtype, device)

    def read(self, checkpoint: Checkpoint, keys: list[ExpertKey]) -> dict[ExpertKey, ExpertWeights]:
        """Read `keys` from the checkpoint into the compute dtype and device (blocking I/O)."""
        weights = {}
        for key in keys:
            raw = checkpoint.expert_weights(key.layer, key.expert)
            weights[key] = ExpertWeights(
                kind=raw.kind,
                up=raw.up.to(device=self.device, dtype=self.dtype).contiguous(),
                down=raw.down.to(device=self.device, dtype=self.dtype).contiguous(),
                activation=raw.activation,
            )
        return weights

    def add(self, weights: dict[ExpertKey, ExpertWeights]) -> None:
        self._weights.update(weights)

    def remove(self, keys: list[ExpertKey]) -> None:
        for key in keys:
            self._weights.pop(key, None)

    @property
    def keys(self) -> list[ExpertKey]:
        return sorted(self._weights)

    @property
    def nbytes(self) -> int:
        return sum(weights.nbytes for weights in self._weights.values())

    def owns(self, key: ExpertKey) -> bool:
        return key in self._weights

    def compute(self, key: ExpertKey, rows: torch.Tensor) -> torch.Tensor:
        """Expert `key` on rows [n, d] -> [n, d] on the CPU, unscaled by any routing weight."""
        weights = self._weights.get(key)
        if weights is None:
            raise InvalidInput(f"this worker does not hold expert {key.expert} of layer {key.layer}")
        with torch.inference_mode():
            outputs = expert_forward(weights, rows.to(self.device, non_blocking=True))
            return outputs if outputs.device.type == "cpu" else outputs.cpu()
