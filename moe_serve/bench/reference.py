"""The in-process reference: transformers' MixtralSparseMoeBlock on the benchmark checkpoint's weights."""

from __future__ import annotations

import torch

from moe_serve.checkpoint import Checkpoint


def reference_block(checkpoint: Checkpoint, layer: int, implementation: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' Mixtral MoE block with `implementation` ("eager" or "grouped_mm") experts."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig.from_pretrained(checkpoint.directory)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    experts = [checkpoint.expert_weights(layer, e) for e in range(checkpoint.spec.num_experts)]
    with torch.no_grad():
        block.gate.weight.copy_(checkpoint.router_weights(layer).gate)
        block.experts.gate_up_proj.copy_(torch.stack([w.up for w in experts]))
        block.experts.down_proj.copy_(torch.stack([w.down for w in experts]))
    return block.to(dtype).eval()


def run_block(block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return block(hidden.unsqueeze(0))[0]
