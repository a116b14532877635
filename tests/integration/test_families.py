"""Routing families through the full stack equal transformers: the served layer (outputs, router logits,
expert ids, dropped slots, dense layers refused) and a transformers model whose MoE blocks patch_model
sends to the gateway (logits, hidden states, greedy generation, router logits).

Each family's checkpoint is built with transformers from a config and saved with save_pretrained, and
served once for every test of this module by a stack of one worker: the family decides the gating,
the shared expert and the combine, not how rows spread over workers (tests/integration/test_exactness.py
serves Mixtral from two, the scaling tests from more). Mixtral reuses the session's FP32 stack. The
stacks are launched one ahead (FamilyStacks): the next one starts while the tests of the current one run.

Which families go through a stack. Every family is checked in one process, in FP32 and BF16, by
tests/unit/test_families_local.py, with the very classes the stack runs: the router's RoutingPlanner
(gating by the family's mechanism, capacity, shared slot) over the checkpoint's router weights as
moe_serve.checkpoint reads them, the workers' ExpertStore (the checkpoint's expert layout, SwiGLU or
dense experts, the shared expert as expert E) and the gateway's CombineBuffer; and patch_model is checked
on every family it supports by tests/unit/test_patching_local.py, with that same served algorithm
answering in place of the gateway. What a stack adds (the wire, the placement of routed and shared
slots, the gateway's combine flags and default capacity, the dense-layer refusal, ModelMetadata) depends
on the family only through these features, so a stack serves one family per gating mechanism
(moe_serve/layer/gating.py, MECHANISMS), chosen so that together they carry every such feature:

| family              | mechanism            | what else it brings through the stack                                  |
| ------------------- | -------------------- | ---------------------------------------------------------------------- |
| mixtral             | softmax_topk         | renormalised; float32 combine weights (the session's stack)            |
| qwen2_moe           | softmax_topk         | not renormalised; gated shared expert; dense layer (mlp_only_layers);  |
|                     |                      | weights in the activation dtype                                        |
| deepseek_v2         | softmax_grouped_topk | expert groups; two shared experts; dense first layer                   |
| deepseek_v3         | sigmoid_grouped_topk | selection bias, groups, scaling; float32 weights with a shared expert  |
| ernie4_5_moe        | softmax_biased_topk  | bias in moe_statics; two shared experts; dense first layer             |
| lfm2_moe            | sigmoid_topk         | expert bias; the block at feed_forward; dense first layer              |
| granitemoe          | logit_topk_softmax   | its own router weight name (router.layer) and fused experts            |
| cohere2_moe_sigmoid | logit_topk_sigmoid   | a shared expert summed in                                              |
| switch              | switch_top1          | the checkpoint's capacity (dropped slots), encoder-decoder layer       |
|                     |                      | numbering, dense (non-gated) experts                                   |

The others reuse one of these mechanisms with other config values (the family's reader turns them into
the RoutingConfig that tests/unit/test_families_local.py checks): qwen3_moe, qwen3_next, olmoe,
flex_olmo, jamba and minimax route as Mixtral/Qwen2-MoE (softmax_topk); glm4_moe, glm4_moe_lite, dots1,
solar_open, exaone_moe and minimax_m2 as DeepSeek-V3 (sigmoid_grouped_topk); cohere2_moe as Granite-MoE
(logit_topk_softmax, its shared expert averaged by a gating output_scale).

patch_model through the stack runs on every family above but Switch (an encoder-decoder it does not
patch): each mechanism, each block attribute (mlp, feed_forward, block_sparse_moe) and router logits
computed both in float32 and in the activation dtype.

In BF16 (outputs bit for bit) a stack serves qwen2_moe (weights in the activation dtype, the gated
shared expert), deepseek_v3 (float32 weights with a shared expert) and switch (capacity on BF16
probabilities); the session's BF16 Mixtral stack is checked by tests/integration/test_exactness.py.
Every family is checked in BF16 in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
# Switch. One list with the patchable ones first: pytest groups tests by a module fixture's parameter
# index, so each family's stack is started once for all of its tests.
PATCHABLE_FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "deepseek_v2",
    "deepseek_v3",
    "ernie4_5_moe",
    "lfm2_moe",
    "granitemoe",
    "cohere2_moe_sigmoid",
]
ALL_FAMILIES = [*PATCHABLE_FAMILIES, "switch"]
PATCHABLE = pytest.mark.parametrize("served", PATCHABLE_FAMILIES, indirect=True)
# `served` parameters of the BF16 checkpoints
BF16_FAMILIES = [f"{family}-bf16" for family in ("qwen2_moe", "deepseek_v3", "switch")]


@dataclass(frozen=True)
class ServedFamily:
    family: str
    directory: Path
    stack: Stack
    moe_layers: tuple[int, ...]
    dtype: torch.dtype = torch.float32


def start_family(key: str, root: Path) -> ServedFamily:
    """Save the tiny checkpoint of `key` ("family" in FP32, "family-bf16" in BF16) and launch a stack serving it."""
    family, _, dtype_name = key.partition("-")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    directory = save_family(family, root / f"tiny-{key}", dtype)
    stack = launch_stack(UpSettings(port=0, workers=1), directory, worker_actor=ExpertWorkerActor)
    return ServedFamily(family, directory, stack, FAMILIES[family].moe_layers, dtype)


class FamilyStacks:
    """The stacks of `order` (the `served` parameters in the order the tests take them), each launched one
    ahead: taking one has the next launched in a background thread, so that its start-up (processes,
    imports, Ray actors) overlaps with the tests of the one taken. A stack is stopped when released, or at
    the end of the module."""

    def __init__(self, root: Path, order: list[str]) -> None:
        self.root, self.order = root, order
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="family-stack")
        self.launches: dict[str, Future[ServedFamily]] = {}

    def _launch(self, key: str) -> Future[ServedFamily]:
        if key not in self.launches:
            self.launches[key] = self.pool.submit(start_family, key, self.root)
        return self.launches[key]

    def launch_next(self, key: str) -> None:
        following = self.order[self.order.index(key) + 1 :] if key in self.order else []
        if following:
            self._launch(following[0])

    def take(self, key: str) -> ServedFamily:
        launch = self._launch(key)
        self.launch_next(key)
        return launch.result()

    def release(self, key: str) -> None:
        launch = self.launches.pop(key)
        if launch.exception() is None:
            launch.result().stack.stop()

    def stop_all(self) -> None:
        self.pool.shutdown(wait=True)
        for key in list(self.launches):
            self.release(key)


@pytest.fixture(scope="module")
def family_stacks(
    request: pytest.FixtureRequest, ray_cluster: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FamilyStacks]:
    # the selected tests of this module in run order (pytest groups them by the module fixture's parameter)
    keys = [
        item.callspec.params["served"]
        for item in request.session.items
        if item.module is request.module and "served" in getattr(getattr(item, "callspec", None), "params", {})
    ]
    stacks = FamilyStacks(tmp_path_factory.mktemp("family"), list(dict.fromkeys(keys)))
    yield stacks
    stacks.stop_all()


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest, family_stacks: FamilyStacks, checkpoints: Callable[[torch.dtype], Path]
) -> Iterator[ServedFamily]:
    """A saved tiny checkpoint of `request.param` (a family, FP32; "family-bf16": BF16) and a stack serving it."""
    key = request.param
    if key == "mixtral":  # the session's stack already serves a saved tiny Mixtral (2 MoE layers)
        stack = request.getfixturevalue("fp32_stack")
        family_stacks.launch_next(key)
        yield ServedFamily(key, checkpoints(torch.float32), stack, (0, 1))
        return
    served = family_stacks.take(key)
    try:
        yield served
    finally:
        family_stacks.release(key)


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
    check_served_layers(served.stack, served.family, served.directory, served.dtype, served.moe_layers)


@pytest.mark.parametrize("served", BF16_FAMILIES, indirect=True)
def test_family_through_the_stack_in_bf16(served: ServedFamily) -> None:
    check_served_layers(served.stack, served.family, served.directory, torch.bfloat16, served.moe_layers)


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
