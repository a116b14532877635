"""Combine: place the expert rows delivered for a request and reduce them to the layer output.

Mirrors the reduction of transformers' default (`grouped_mm`) experts path: each routed slot's
output is scaled by its routing weight and a token's k slots are summed, then cast once to the
activation dtype. The weights are float32 (Mixtral, DeepSeek: products and sum in float32) or
cast to the activation dtype first (Qwen, Switch), exactly as each model does. A shared expert's
output, scaled by its gate, is added afterwards in the activation dtype, as the models add it.
Slots that capacity dropped were never filled and have weight 0: they contribute nothing (the
residual carries those tokens).
"""

from __future__ import annotations

import torch

from moe_serve.runtime.errors import InvalidInput

# a delivery of at most this many rows is placed row by row (T=1 decode: one row per expert)
FEW_ROWS = 8
# tokens combined at a time: their [n, k, d] products stay in cache instead of one [T, k, d] temporary
# (T=2048, d=1024: k=2 5.4 -> 3.4 ms, k=8 124 -> 19 ms; each token's sum is the same, so the same bits)
COMBINE_CHUNK_TOKENS = 128


class CombineBuffer:
    """Receives expert rows for one request, in any order, each slot at most once.

    contributions: [T * slots_per_token, d] expert outputs, unscaled, in the compute dtype; a
    token's slots are its k routed slots followed by its shared-expert slot, if any.
    """

    def __init__(self, num_tokens: int, slots_per_token: int, hidden_size: int, dtype: torch.dtype) -> None:
        self.num_tokens, self.slots_per_token, self.hidden_size = num_tokens, slots_per_token, hidden_size
        # not zeroed: every slot is filled by a delivery or zeroed at combine (a dropped slot); at
        # T=2048, k=2, d=1024 the zeroing alone cost 2.6 ms per request
        self.contributions = torch.empty(num_tokens * slots_per_token, hidden_size, dtype=dtype)
        # one flag per slot, read by Python for a few rows and through a tensor view for many
        self._filled_flags = bytearray(num_tokens * slots_per_token)
        self._filled = torch.frombuffer(self._filled_flags, dtype=torch.bool)
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
        if positions.numel() <= FEW_ROWS:
            return self._add_few(positions.tolist(), rows)
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

    def _add_few(self, slots: list[int], rows: torch.Tensor) -> int:
        """`add` for a decode step's few rows: Python checks instead of a dozen small tensor ops."""
        flags = self._filled_flags
        if any(slot < 0 or slot >= len(flags) for slot in slots):
            raise InvalidInput(f"delivery positions outside [0, {len(flags)})")
        if len(set(slots)) != len(slots):
            raise InvalidInput("delivery names the same slot twice")
        added = 0
        for index, slot in enumerate(slots):
            if not flags[slot]:
                self.contributions[slot] = rows[index]
                flags[slot] = 1
                added += 1
        self.rows_filled += added
        return added

    def combine(
        self,
        expert_weights: torch.Tensor,
        shared_weights: torch.Tensor | None = None,
        weights_in_activation_dtype: bool = False,
    ) -> torch.Tensor:
        """[T, d] layer output.

        expert_weights: [T, k] float32 routed weights; shared_weights: [T, S] float32 shared
        gates (S = slots_per_token - k); weights_in_activation_dtype: scale in the activation
        dtype rather than float32, as Qwen and Switch do.
        """
        if self.rows_filled < self._filled.numel():  # dropped slots (weight 0) contribute exactly 0
            self.contributions[~self._filled] = 0
        dtype = self.contributions.dtype
        slots = self.contributions.view(self.num_tokens, self.slots_per_token, self.hidden_size)
        weights = expert_weights.to(dtype) if weights_in_activation_dtype else expert_weights
        gates = None
        if self.slots_per_token > expert_weights.shape[1] and shared_weights is not None:
            gates = shared_weights.to(dtype).unsqueeze(-1)
        if self.num_tokens <= COMBINE_CHUNK_TOKENS:
            return _combine_rows(slots, weights, gates, dtype)
        output = torch.empty(self.num_tokens, self.hidden_size, dtype=dtype)
        for start in range(0, self.num_tokens, COMBINE_CHUNK_TOKENS):
            rows = slice(start, start + COMBINE_CHUNK_TOKENS)
            output[rows] = _combine_rows(slots[rows], weights[rows], None if gates is None else gates[rows], dtype)
        return output


def _combine_rows(
    slots: torch.Tensor, weights: torch.Tensor, gates: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """[n, d] output of n tokens' slots [n, k + S, d]: the model's own expressions, token by token."""
    top_k = weights.shape[1]
    # type promotion does what the model does: bf16 x fp32 -> fp32 sum; bf16 x bf16 -> bf16
    output = (slots[:, :top_k] * weights.unsqueeze(-1)).sum(dim=1).to(dtype)
    if gates is not None:
        output = output + (slots[:, top_k:] * gates).sum(dim=1)
    return output
