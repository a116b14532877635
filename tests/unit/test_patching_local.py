"""patch_model on every family it supports, with the served algorithm in this process standing in for the
gateway (tests.patching_checks.InProcessGateway): the same checks that tests/integration/test_families.py
runs through a full stack.

What this covers family by family, without any service: patch_model's table for the model_type
(the routing family it expects the gateway to report, where the block sits, the router logits' dtype),
the router class transformers records logits from, and the family's transformers model code running
with RemoteMoE blocks (logits, hidden states, greedy generation, output_router_logits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_serve_client.patching import SUPPORTED_MODEL_TYPES
from tests.families import FAMILIES, load_reference, reference_output, reference_routing, save_family
from tests.patching_checks import (
    InProcessGateway,
    check_greedy_generation_is_identical,
    check_output_router_logits_equal_the_local_router,
    check_patch_replaces_exactly_the_moe_blocks,
    check_patched_logits_equal_the_local_model,
)

# every test family of a model_type patch_model supports (Switch is an encoder-decoder: not patched)
PATCHABLE = sorted(name for name, family in FAMILIES.items() if family.config().model_type in SUPPORTED_MODEL_TYPES)


def test_every_supported_model_type_has_a_test_family() -> None:
    assert {FAMILIES[name].config().model_type for name in PATCHABLE} == set(SUPPORTED_MODEL_TYPES)


# slow (a transformers model per family, greedy generation included: minutes on 2 cores): `make test`
# runs it, `make test-unit` and `make test-fast` leave it out
@pytest.mark.slow
@pytest.mark.parametrize("family", PATCHABLE)
def test_patched_model_equals_the_local_model(family: str, tmp_path: Path) -> None:
    directory = save_family(family, tmp_path / f"tiny-{family}")
    gateway = InProcessGateway(directory)
    moe_layers = FAMILIES[family].moe_layers
    check_patch_replaces_exactly_the_moe_blocks(family, directory, moe_layers, gateway, directory.name)
    check_patched_logits_equal_the_local_model(family, directory, gateway, directory.name)
    check_greedy_generation_is_identical(family, directory, gateway)
    for hooked in (False, True):  # transformers' recording hooks installed after patching, and before
        check_output_router_logits_equal_the_local_router(family, directory, moe_layers, gateway, hooked)


def test_in_process_gateway_answers_what_the_checkpoint_serves(tmp_path: Path) -> None:
    """The stand-in itself: the metadata of a Switch checkpoint, and its outputs at the capacity of its config."""
    directory = save_family("switch", tmp_path / "tiny-switch")
    gateway = InProcessGateway(directory)
    metadata = gateway.model_metadata(directory.name)
    assert (metadata.family, metadata.moe_layers, metadata.num_experts, metadata.top_k) == ("switch", (1, 3), 4, 1)
    model = load_reference("switch", directory, torch.float32)
    for layer in metadata.moe_layers:
        hidden = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(layer))
        served = gateway.infer(directory.name, hidden, layer=layer, outputs=("output", "router_logits"))
        logits, _ = reference_routing("switch", model, layer, hidden.reshape(40, 64))
        torch.testing.assert_close(served["router_logits"], logits, rtol=0, atol=0)
        expected = reference_output("switch", model, layer, hidden.reshape(40, 64)).reshape(hidden.shape)
        torch.testing.assert_close(served["output"], expected, rtol=1e-5, atol=1e-5)
        assert bool((expected == 0).all(dim=-1).any()), "capacity 3 per expert drops some of 40 tokens"
