"""What patch_model must give for a routing family (tests.families): the checks themselves, run against
a gateway of a full stack (tests/integration/test_families.py) and against the served algorithm in this
process (tests/unit/test_patching_local.py, through `InProcessGateway`).

Each check loads the family's saved model twice with transformers (float32, eval mode), patches one
copy to `gateway` (a "host:port" or a MoEClient) and compares it with the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from gateway.converters import model_metadata
from gateway.model import ServedModel
from moe_serve.client import MoEClient, RemoteMoE, patch_model
from moe_serve_client.patching import block_attribute, router_recorder
from moe_serve_client.protocol import ServedModelMetadata
from tests.families import DECODER, load_reference
from tests.local_layer import LocalServedLayers

VOCAB = DECODER["vocab_size"]
PROMPT_SHAPE = (2, 7)
NEW_TOKENS = 6
TOLERANCE = 1e-5

Gateway = str | MoEClient


def load(family: str, directory: Path) -> torch.nn.Module:
    """The saved model loaded by transformers, float32, eval mode."""
    return load_reference(family, directory, torch.float32)


def prompts(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, PROMPT_SHAPE, generator=torch.Generator().manual_seed(seed))


def check_patch_replaces_exactly_the_moe_blocks(
    family: str, directory: Path, moe_layers: tuple[int, ...], gateway: Gateway, model_name: str
) -> None:
    reference, model = load(family, directory), load(family, directory)
    patched = patch_model(model, gateway)  # default model name: the checkpoint directory's
    assert patched == list(moe_layers)
    attribute, (router_class, _) = block_attribute(model), router_recorder(model)
    for index, (local_layer, patched_layer) in enumerate(zip(reference.model.layers, model.model.layers, strict=True)):
        local_block, patched_block = getattr(local_layer, attribute), getattr(patched_layer, attribute)
        if index in moe_layers:
            assert isinstance(patched_block, RemoteMoE)
            assert (patched_block.layer_idx, patched_block.model_name) == (index, model_name)
            # transformers records router logits from the family's router class, found under the same name
            router_name = next(n for n, child in local_block.named_children() if isinstance(child, router_class))
            assert isinstance(getattr(patched_block, router_name), type(getattr(local_block, router_name)))
            assert getattr(patched_block, router_name) is patched_block.served_router
        else:  # a dense layer stays the local module
            assert type(patched_block) is type(local_block)
            assert not isinstance(patched_block, RemoteMoE)
    # the block attributes model code reads are kept
    if family == "mixtral":
        assert model.model.layers[0].mlp.top_k == reference.model.layers[0].mlp.top_k
    if family == "deepseek_v3":
        assert model.model.layers[1].mlp.config is model.config
    # the experts are no longer held locally: what follows is computed by the gateway
    assert not any(".experts." in name or "shared_expert" in name for name, _ in model.named_parameters())
    empty = torch.zeros(1, 0, model.config.hidden_size)
    assert getattr(model.model.layers[moe_layers[0]], attribute)(empty).shape == empty.shape


def check_patched_logits_equal_the_local_model(family: str, directory: Path, gateway: Gateway, model_name: str) -> None:
    reference, model = load(family, directory), load(family, directory)
    patch_model(model, gateway, model_name)
    input_ids = prompts()
    with torch.no_grad():
        expected = reference(input_ids, output_hidden_states=True)
        actual = model(input_ids, output_hidden_states=True)
    assert actual.logits.shape == (*PROMPT_SHAPE, VOCAB)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=TOLERANCE, atol=TOLERANCE)
    # the residual stream is O(1) where the logits of a tiny model are small: a tighter check of every layer
    for served_states, local_states in zip(actual.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(served_states, local_states, rtol=TOLERANCE, atol=TOLERANCE)


def check_greedy_generation_is_identical(family: str, directory: Path, gateway: Gateway) -> None:
    reference, model = load(family, directory), load(family, directory)
    patch_model(model, gateway)
    input_ids = prompts(seed=1)
    options = {
        "attention_mask": torch.ones_like(input_ids),
        "do_sample": False,
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,  # no early end of sequence: all tokens are compared
        "pad_token_id": 0,
    }
    expected = reference.generate(input_ids, **options)
    actual = model.generate(input_ids, **options)
    assert actual.shape == (PROMPT_SHAPE[0], PROMPT_SHAPE[1] + NEW_TOKENS)
    assert torch.equal(actual, expected)


def check_output_router_logits_equal_the_local_router(
    family: str, directory: Path, moe_layers: tuple[int, ...], gateway: Gateway, hooked_before_patching: bool
) -> None:
    reference, model = load(family, directory), load(family, directory)
    input_ids = prompts(seed=2)
    if hooked_before_patching:  # transformers installs its recording hooks on the first call that asks
        with torch.no_grad():
            model(input_ids, output_router_logits=True)
    patch_model(model, gateway)
    with torch.no_grad():
        expected = reference(input_ids, output_router_logits=True)
        actual = model(input_ids, output_router_logits=True)
    num_tokens = PROMPT_SHAPE[0] * PROMPT_SHAPE[1]
    assert len(actual.router_logits) == len(expected.router_logits) == len(moe_layers)
    for served_logits, local_logits in zip(actual.router_logits, expected.router_logits, strict=True):
        assert served_logits.shape == local_logits.shape == (num_tokens, local_logits.shape[-1])
        assert served_logits.dtype == local_logits.dtype
        torch.testing.assert_close(served_logits, local_logits, rtol=TOLERANCE, atol=TOLERANCE)
    if expected.aux_loss is not None:  # the load-balancing loss is computed from the router logits
        torch.testing.assert_close(actual.aux_loss, expected.aux_loss, rtol=TOLERANCE, atol=TOLERANCE)


class InProcessGateway(MoEClient):
    """A MoEClient that opens no channel: ModelMetadata is the gateway's own (gateway.converters) for the
    facts the router reports of the checkpoint, and `infer` computes the layer with the served algorithm
    in this process (tests.local_layer: the router's planner, the workers' expert store, the gateway's
    combine), at the checkpoint's own capacity as the gateway applies it."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float32) -> None:  # no super(): no channel
        self.address = f"in-process:{directory.name}"
        self.layers = LocalServedLayers(directory, dtype)
        spec = self.layers.spec
        # what the router's GetModelInfo reports and the gateway serves (router_service.servicer, gateway.model)
        self.model = ServedModel(
            name=directory.name,
            family=spec.routing.family,
            hidden_size=spec.hidden_size,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            moe_layers=tuple(spec.moe_layers),
            num_layers=spec.num_layers,
            compute_dtype=dtype,
            num_shared_slots=spec.num_shared_slots,
            weights_in_activation_dtype=spec.routing.weights_in_activation_dtype,
            default_expert_capacity=spec.default_expert_capacity,
        )

    def model_metadata(self, model: str, timeout: float | None = None) -> ServedModelMetadata:
        assert model == self.model.name, model
        return ServedModelMetadata.from_response(model_metadata(self.model, {}))

    def infer(
        self,
        model: str,
        hidden_states: torch.Tensor,
        layer: int = 0,
        outputs: Sequence[str] | str = ("output",),
        timeout: float | None = None,
    ) -> dict[str, torch.Tensor]:
        assert model == self.model.name, model
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        output, decision = self.layers.compute(layer, flat, self.model.default_expert_capacity)
        computed = {"output": output.reshape(hidden_states.shape), "router_logits": decision.gating.router_logits}
        return {name: computed[name] for name in ((outputs,) if isinstance(outputs, str) else outputs)}

    def close(self) -> None:
        pass
