"""The experts one worker owns: their weights, in the compute dtype on the compute device, and the FFN."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from moe_serve.checkpoint import Checkpoint, ExpertWeights
from moe_serve.errors import InvalidInput
from moe_serve.placement import ExpertKey

logger = logging.getLogger(__name__)


class ExpertStore:
    """Weights of this worker's experts, materialised once from the checkpoint."""

    def __init__(self, checkpoint: Checkpoint, keys: list[ExpertKey], dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.hidden_size = checkpoint.spec.hidden_size
        self._weights: dict[ExpertKey, ExpertWeights] = {}
        for key in keys:
            raw = checkpoint.expert_weights(key.layer, key.expert)
            self._weights[key] = ExpertWeights(
                gate_up=raw.gate_up.to(device=device, dtype=dtype).contiguous(),
                down=raw.down.to(device=device, dtype=dtype).contiguous(),
            )
        logger.info("loaded %d expert(s), %.1f MiB, %s on %s", len(keys), self.nbytes / 2**20, dtype, device)

    @property
    def keys(self) -> list[ExpertKey]:
        return sorted(self._weights)

    @property
    def nbytes(self) -> int:
        return sum(weights.nbytes for weights in self._weights.values())

    def owns(self, key: ExpertKey) -> bool:
        return key in self._weights

    def compute(self, key: ExpertKey, rows: torch.Tensor) -> torch.Tensor:
        """SwiGLU FFN of one expert: down(silu(gate(x)) * up(x)) for rows [n, d] -> [n, d], unscaled.

        Same operations, in the same order and dtype, as transformers' Mixtral experts.
        """
        weights = self._weights.get(key)
        if weights is None:
            raise InvalidInput(f"this worker does not hold expert {key.expert} of layer {key.layer}")
        with torch.inference_mode():
            inputs = rows.to(self.device, non_blocking=True)
            gate, up = F.linear(inputs, weights.gate_up).chunk(2, dim=-1)
            outputs = F.linear(F.silu(gate) * up, weights.down)
            return outputs if outputs.device.type == "cpu" else outputs.cpu()
