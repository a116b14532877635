"""Combine: place the expert rows delivered for a request and reduce them to the layer output.

Mirrors the reduction of transformers' default (`grouped_mm`) experts path: each slot's expert
output is scaled by its float32 routing weight, the k slots of a token are summed in float32,
and the sum is cast once to the activation dtype. Slots that capacity dropped were never filled
and have weight 0, so they contribute nothing (the residual carries those tokens).
"""

from __future__ import annotations

import torch

from moe_serve.errors import InvalidInput


class CombineBuffer:
    """Receives expert rows for one request, in any order, each slot at most once.

    contributions: [T * k, d] expert outputs, unscaled, in the compute dtype.
    """

    def __init__(self, num_tokens: int, top_k: int, hidden_size: int, dtype: torch.dtype) -> None:
        self.num_tokens, self.top_k, self.hidden_size = num_tokens, top_k, hidden_size
        self.contributions = torch.zeros(num_tokens * top_k, hidden_size, dtype=dtype)
        self._filled = torch.zeros(num_tokens * top_k, dtype=torch.bool)
        self.rows_filled = 0

    def add(self, positions: torch.Tensor, rows: torch.Tensor) -> int:
        """Place `rows` [n, d] at flat slot `positions` [n]; returns how many were new.

        A slot already filled (a duplicate delivery after a retry) is ignored, so a retried
        computation can never count twice.
        """
        if positions.dim() != 1 or rows.dim() != 2 or rows.shape[0] != positions.shape[0]:
            raise InvalidInput(f"delivery has {tuple(rows.shape)} rows for {tuple(positions.shape)} positions")
        if rows.shape[1] != self.hidden_size or rows.dtype != self.contributions.dtype:
            raise InvalidInput(
                f"delivery rows are {rows.dtype} [*, {rows.shape[1]}], expected "
                f"{self.contributions.dtype} [*, {self.hidden_size}]"
            )
        positions = positions.long()
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self._filled.numel()):
            raise InvalidInput(f"delivery positions outside [0, {self._filled.numel()})")
        if torch.unique(positions).numel() != positions.numel():
            raise InvalidInput("delivery names the same slot twice")
        new = ~self._filled[positions]
        if not bool(new.all()):
            positions, rows = positions[new], rows[new]
        self.contributions[positions] = rows
        self._filled[positions] = True
        self.rows_filled += int(positions.numel())
        return int(positions.numel())

    def combine(self, expert_weights: torch.Tensor) -> torch.Tensor:
        """[T, d] layer output from the float32 combine weights [T, k]."""
        slots = self.contributions.view(self.num_tokens, self.top_k, self.hidden_size)
        weighted = slots.float() * expert_weights.unsqueeze(-1)
        return weighted.sum(dim=1).to(self.contributions.dtype)
