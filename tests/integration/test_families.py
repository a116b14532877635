"""Every routing family through the full stack equals transformers: the served layer (outputs, router
logits, expert ids, dropped slots, dense layers refused) and a transformers model whose MoE blocks
patch_model sends to the gateway (logits, greedy generation, router logits).

Each family's checkpoint is built with transformers from a config and saved with save_pretrained, and
served once for every test of this module by a stack of one worker: the family decides the gating,
the shared expert and the combine, not how rows spread over workers (tests/integration/test_exactness.py
serves Mixtral from two, the scaling tests from more). Mixtral reuses the session's FP32 stack.

Every family is served in FP32 here and in both FP32 and BF16 in-process (tests/unit/test_families_local.py);
the families that reuse another's router, DeepSeek-V3 and Switch are also served in BF16, each by a
stack of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from expert_service.actor import ExpertWorkerActor
from moe_serve.cluster.launcher import Stack, launch_stack
from moe_serve.config import UpSettings
from tests.families import FAMILIES, load_reference, reference_output, reference_routing, save_family
from tests.helpers import infer_request, kserve_stub, response_tensors
from tests.patching_checks import (
    check_greedy_generation_is_identical,
    check_output_router_logits_equal_the_local_router,
    check_patch_replaces_exactly_the_moe_blocks,
    check_patched_logits_equal_the_local_model,
)

OUTPUTS = ("output", "router_logits", "expert_ids", "dropped_mask")

# decoder families whose transformers model patch_model patches; the served-layer test takes these and
# the rest. One list with the patchable ones first: pytest groups tests by a module fixture's parameter
# index, so each family's stack is started once for all of its tests.
PATCHABLE_FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_next",
    "jamba",
    "minimax",
    "minimax_m2",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "dots1",
    "glm4_moe_lite",
    "solar_open",
    "exaone_moe",
    "granitemoe",
    "cohere2_moe_sigmoid",
    "ernie4_5_moe",
    "lfm2_moe",
]
ALL_FAMILIES = [*PATCHABLE_FAMILIES, "qwen3_moe", "olmoe", "flex_olmo", "cohere2_moe", "switch"]
PATCHABLE = pytest.mark.parametrize("served", PATCHABLE_FAMILIES, indirect=True)


@dataclass(frozen=True)
class ServedFamily:
    family: str
    directory: Path
    stack: Stack
    moe_layers: tuple[int, ...]


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest,
    ray_cluster: str,
    checkpoints: Callable[[torch.dtype], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServedFamily]:
    """A saved tiny FP32 checkpoint of the family `request.param` and a stack serving it."""
    family = request.param
    if family == "mixtral":  # the session's stack already serves a saved tiny Mixtral (2 MoE layers)
        stack = request.getfixturevalue("fp32_stack")
        yield ServedFamily(family, checkpoints(torch.float32), stack, (0, 1))
        return
    directory = save_family(family, tmp_path_factory.mktemp("family") / f"tiny-{family}")
    stack = launch_stack(UpSettings(port=0, workers=1), directory, worker_actor=ExpertWorkerActor)
    try:
        yield ServedFamily(family, directory, stack, FAMILIES[family].moe_layers)
    finally:
        stack.stop()


def check_served_layers(
    stack: Stack, family: str, directory: Path, dtype: torch.dtype, moe_layers: tuple[int, ...]
) -> None:
    """Every MoE layer (`moe_layers`) of the served checkpoint answers exactly what the family's transformers block
    computes, at 1, 9 and 40 tokens; a dense layer is refused with INVALID_ARGUMENT."""
    model = load_reference(family, directory, dtype)
    assert {key.expert for record in stack.workers for key in record.experts} >= set(range(4))
    channel, stub = kserve_stub(stack.address)
    with channel:
        for layer in moe_layers:
            for num_tokens in (1, 9, 40):
                generator = torch.Generator().manual_seed(100 * layer + num_tokens)
                hidden = torch.randn(num_tokens, 64, generator=generator).to(dtype)
                request = infer_request(stack.model_name, hidden, layer=layer, outputs=OUTPUTS)
                result = response_tensors(stub.ModelInfer(request, timeout=60))
                logits, ids = reference_routing(family, model, layer, hidden)
                assert torch.equal(result["expert_ids"].long(), ids), (family, layer, num_tokens)
                torch.testing.assert_close(result["router_logits"], logits, rtol=0, atol=0)
                expected = reference_output(family, model, layer, hidden)
                tolerance = 1e-5 if dtype == torch.float32 else 0.0
                torch.testing.assert_close(result["output"], expected, rtol=tolerance, atol=tolerance)
                # dropped slots: only Switch has a capacity of its own; a dropped token outputs 0
                dropped = result["dropped_mask"]
                if family != "switch":
                    assert not bool(dropped.any())
                else:
                    assert torch.equal(dropped[:, 0], (expected == 0).all(dim=-1))
        dense = sorted(set(range(model.config.num_hidden_layers)) - set(moe_layers)) if family != "switch" else []
        if dense:
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(infer_request(stack.model_name, hidden, layer=dense[0]), timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "dense layer" in raised.value.details()


@pytest.mark.parametrize("served", ALL_FAMILIES, indirect=True)
def test_family_through_the_stack(served: ServedFamily) -> None:
    check_served_layers(served.stack, served.family, served.directory, torch.float32, served.moe_layers)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "deepseek_v3", "switch"])
def test_family_through_the_stack_in_bf16(ray_cluster, tmp_path: Path, family: str) -> None:
    directory = save_family(family, tmp_path / family, torch.bfloat16)
    stack = launch_stack(UpSettings(port=0, workers=1), directory, worker_actor=ExpertWorkerActor)
    try:
        check_served_layers(stack, family, directory, torch.bfloat16, FAMILIES[family].moe_layers)
    finally:
        stack.stop()


@PATCHABLE
def test_patch_model_replaces_exactly_the_moe_blocks(served: ServedFamily) -> None:
    check_patch_replaces_exactly_the_moe_blocks(
        served.family, served.directory, served.moe_layers, served.stack.address, served.stack.model_name
    )


@PATCHABLE
def test_patched_logits_equal_the_local_model(served: ServedFamily) -> None:
    check_patched_logits_equal_the_local_model(
        served.family, served.directory, served.stack.address, served.stack.model_name
    )


@PATCHABLE
def test_greedy_generation_is_identical(served: ServedFamily) -> None:
    check_greedy_generation_is_identical(served.family, served.directory, served.stack.address)


@PATCHABLE
@pytest.mark.parametrize("hooked_before_patching", [False, True], ids=["hooks-after", "hooks-before"])
def test_output_router_logits_equal_the_local_router(served: ServedFamily, hooked_before_patching: bool) -> None:
    check_output_router_logits_equal_the_local_router(
        served.family, served.directory, served.moe_layers, served.stack.address, hooked_before_patching
    )
