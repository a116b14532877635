"""In-process references: transformers' own MoE blocks on a checkpoint's weights.

The benchmark times `MixtralSparseMoeBlock` built from the checkpoint's MoE tensors alone (the demo
checkpoint has no attention or embedding weights). The soak checks answers of any served family
against `reference_layers`: for Mixtral the same block, for the other families the blocks of the
model transformers loads from the checkpoint directory (its whole model: fine for the small
checkpoints a soak runs on, and independent of moe-serve's own checkpoint reader).
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

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
        output = block(hidden.unsqueeze(0))[0]
    if output.is_cuda:
        torch.cuda.synchronize(output.device)  # a timed call measures the work, not its launch
    return output


@dataclass(frozen=True)
class ReferenceLayer:
    """One served MoE layer as transformers computes it: its block's output and its router's logits.

    Safe to call from several threads (the soak's clients check answers concurrently).
    """

    block: torch.nn.Module
    router: torch.nn.Module
    router_output_index: int  # where the router's output holds the logits (transformers' OutputRecorder)
    # a recording hook on the shared router must see only its own block run
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @functools.cached_property
    def _router_needs_block(self) -> bool:
        """The router takes more than the hidden states (MiniMax-M2's and LFM2-MoE's get the block's
        selection bias), so its logits are recorded while the block runs, as transformers records them."""
        return len(inspect.signature(self.router.forward).parameters) > 1

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output for hidden [T, d]."""
        if not self._router_needs_block:
            return run_block(self.block, hidden)
        with self._lock:
            return run_block(self.block, hidden)

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The router's logits [T, E] for hidden [T, d], in float32."""
        if not self._router_needs_block:
            with torch.inference_mode():
                return self._logits(self.router(hidden.unsqueeze(0)), hidden)
        recorded: list[Any] = []
        with self._lock:
            handle = self.router.register_forward_hook(lambda _module, _inputs, routed: recorded.append(routed))
            try:
                run_block(self.block, hidden)
            finally:
                handle.remove()
        return self._logits(recorded[-1], hidden)

    def _logits(self, routed: Any, hidden: torch.Tensor) -> torch.Tensor:
        logits = routed[self.router_output_index] if isinstance(routed, tuple) else routed
        return logits.reshape(hidden.shape[0], -1).float()


def reference_layers(checkpoint: Checkpoint, dtype: torch.dtype) -> dict[int, ReferenceLayer]:
    """Every MoE layer of `checkpoint`, keyed by the layer number the gateway serves it under."""
    if checkpoint.spec.model_type == "mixtral":
        blocks = {layer: reference_block(checkpoint, layer, "eager", dtype) for layer in checkpoint.spec.moe_layers}
        return {layer: ReferenceLayer(block, block.gate, 0) for layer, block in blocks.items()}
    return _loaded_model_layers(checkpoint, dtype)


def _loaded_model_layers(checkpoint: Checkpoint, dtype: torch.dtype) -> dict[int, ReferenceLayer]:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from moe_serve_client.patching import block_attribute, decoder_layers, router_recorder

    spec = checkpoint.spec
    encoder_decoder = spec.routing.family == "switch"
    model_class = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    model = model_class.from_pretrained(checkpoint.directory, dtype=dtype).eval()
    # Switch declares its router on the encoder and decoder stacks, not on the whole model
    router_class, router_index = router_recorder(model.encoder if encoder_decoder else model)
    if encoder_decoder:
        # Switch: the encoder's sparse feed-forward is layer[1] of its block, the decoder's layer[2]
        # (after cross-attention); decoder block b is served as layer num_layers + b
        encoder_layers = model.config.num_layers
        blocks = {i: block.layer[1].mlp for i, block in enumerate(model.encoder.block)}
        blocks |= {encoder_layers + i: block.layer[2].mlp for i, block in enumerate(model.decoder.block)}
    else:
        attribute = block_attribute(model)
        blocks = {i: getattr(layer, attribute) for i, layer in enumerate(decoder_layers(model))}
    references = {}
    for layer in spec.moe_layers:
        routers = [child for child in blocks[layer].children() if isinstance(child, router_class)]
        if not routers:
            raise ValueError(f"layer {layer} of {checkpoint.directory} is served as MoE but transformers' is dense")
        references[layer] = ReferenceLayer(blocks[layer], routers[0], router_index)
    return references
