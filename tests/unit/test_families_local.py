"""Every routing family, served algorithm in one process (no servers), equals its transformers module.

The full-stack version of these checks is tests/integration/test_families.py, on one family per gating
mechanism (its docstring says which and why); this one covers every family, runs in seconds and pinpoints
gating/combine differences without any service in the way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_serve.checkpoint import Checkpoint
from tests.families import FAMILIES, load_reference, reference_output, reference_routing, save_family
from tests.local_layer import local_layer


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    made: dict[tuple[str, torch.dtype], Path] = {}

    def get(family: str, dtype: torch.dtype) -> Path:
        if (family, dtype) not in made:
            made[family, dtype] = save_family(family, tmp_path_factory.mktemp(family) / family, dtype)
        return made[family, dtype]

    return get


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_served_algorithm_equals_transformers(family_checkpoints, family: str, dtype: torch.dtype) -> None:
    directory = family_checkpoints(family, dtype)
    model = load_reference(family, directory, dtype)
    spec = Checkpoint(directory).spec
    assert spec.moe_layers == FAMILIES[family].moe_layers
    dropped = 0
    for layer in spec.moe_layers:
        # Switch's own capacity (3) binds at 10 tokens: the comparison includes dropped tokens
        hidden = torch.randn(10, 64, generator=torch.Generator().manual_seed(layer)).to(dtype)
        capacity = spec.default_expert_capacity
        output, decision = local_layer(directory, layer, hidden, capacity=capacity)
        logits, ids = reference_routing(family, model, layer, hidden)
        assert torch.equal(decision.gating.expert_ids, ids), family
        torch.testing.assert_close(decision.gating.router_logits, logits, rtol=0, atol=0)
        expected = reference_output(family, model, layer, hidden)
        dropped += int(decision.outcome.dropped.sum())
        if dtype == torch.float32:
            torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(output.float(), expected.float(), rtol=0, atol=0)
    assert (dropped > 0) == (family == "switch"), "only Switch has a capacity of its own, and it must bind here"
