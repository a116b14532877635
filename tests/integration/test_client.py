"""The client library against real stacks: MoEClient / AsyncMoEClient round trips and errors, and
transformers models whose MoE blocks are patched to the gateway (patch_model) computing what the local
model computes: logits, greedy generation and router logits.

Each family's checkpoint is built with transformers from a config and saved with save_pretrained;
Mixtral reuses the session's fp32 stack, Qwen2-MoE (a dense layer, a shared expert) and DeepSeek-V3
(a dense first layer, shared experts, grouped sigmoid routing) get a stack each, started once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_serve.client import AsyncMoEClient, GatewayError, ModelMismatch, MoEClient, RemoteMoE, patch_model
from moe_serve.config import UpSettings
from moe_serve.launcher import Stack, launch_stack
from moe_serve_client.patching import block_attribute, router_recorder
from tests.families import DECODER, FAMILIES, load_reference, save_family
from tests.helpers import TINY_MIXTRAL, reference_blocks, reference_forward

VOCAB = DECODER["vocab_size"]
PROMPT_SHAPE = (2, 7)
NEW_TOKENS = 6
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ServedFamily:
    family: str
    directory: Path
    stack: Stack
    moe_layers: tuple[int, ...]


@pytest.fixture(
    scope="module",
    params=[
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
    ],
)
def served(
    request: pytest.FixtureRequest,
    ray_cluster: str,
    checkpoints: Callable[[torch.dtype], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServedFamily]:
    """A saved tiny checkpoint of the family and a running stack serving it (one per family)."""
    family = request.param
    if family == "mixtral":  # the session's stack already serves a saved tiny Mixtral (2 MoE layers)
        stack = request.getfixturevalue("fp32_stack")
        yield ServedFamily(family, checkpoints(torch.float32), stack, (0, 1))
        return
    directory = save_family(family, tmp_path_factory.mktemp("client") / f"tiny-{family}")
    stack = launch_stack(UpSettings(port=0, workers=1), directory)  # the client's concern is not the fan-out
    try:
        yield ServedFamily(family, directory, stack, FAMILIES[family].moe_layers)
    finally:
        stack.stop()


def load(served: ServedFamily) -> torch.nn.Module:
    """The saved model loaded by transformers, float32, eval mode."""
    return load_reference(served.family, served.directory, torch.float32)


def prompts(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, PROMPT_SHAPE, generator=torch.Generator().manual_seed(seed))


def test_patch_model_replaces_exactly_the_moe_blocks(served: ServedFamily) -> None:
    reference, model = load(served), load(served)
    patched = patch_model(model, served.stack.address)  # default model name: the checkpoint directory's
    assert patched == list(served.moe_layers)
    attribute, (router_class, _) = block_attribute(model), router_recorder(model)
    for index, (local_layer, patched_layer) in enumerate(zip(reference.model.layers, model.model.layers, strict=True)):
        local_block, patched_block = getattr(local_layer, attribute), getattr(patched_layer, attribute)
        if index in served.moe_layers:
            assert isinstance(patched_block, RemoteMoE)
            assert (patched_block.layer_idx, patched_block.model_name) == (index, served.stack.model_name)
            # transformers records router logits from the family's router class, found under the same name
            router_name = next(n for n, child in local_block.named_children() if isinstance(child, router_class))
            assert isinstance(getattr(patched_block, router_name), type(getattr(local_block, router_name)))
            assert getattr(patched_block, router_name) is patched_block.served_router
        else:  # a dense layer stays the local module
            assert type(patched_block) is type(local_block)
            assert not isinstance(patched_block, RemoteMoE)
    # the block attributes model code reads are kept
    if served.family == "mixtral":
        assert model.model.layers[0].mlp.top_k == reference.model.layers[0].mlp.top_k
    if served.family == "deepseek_v3":
        assert model.model.layers[1].mlp.config is model.config
    # the experts are no longer held locally: what follows is computed by the gateway
    assert not any(".experts." in name or "shared_expert" in name for name, _ in model.named_parameters())
    empty = torch.zeros(1, 0, model.config.hidden_size)
    assert getattr(model.model.layers[served.moe_layers[0]], attribute)(empty).shape == empty.shape


def test_patched_logits_equal_the_local_model(served: ServedFamily) -> None:
    reference, model = load(served), load(served)
    patch_model(model, served.stack.address, served.stack.model_name)
    input_ids = prompts()
    with torch.no_grad():
        expected = reference(input_ids, output_hidden_states=True)
        actual = model(input_ids, output_hidden_states=True)
    assert actual.logits.shape == (*PROMPT_SHAPE, VOCAB)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=TOLERANCE, atol=TOLERANCE)
    # the residual stream is O(1) where the logits of a tiny model are small: a tighter check of every layer
    for served_states, local_states in zip(actual.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(served_states, local_states, rtol=TOLERANCE, atol=TOLERANCE)


def test_greedy_generation_is_identical(served: ServedFamily) -> None:
    reference, model = load(served), load(served)
    patch_model(model, served.stack.address)
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


@pytest.mark.parametrize("hooked_before_patching", [False, True], ids=["hooks-after", "hooks-before"])
def test_output_router_logits_equal_the_local_router(served: ServedFamily, hooked_before_patching: bool) -> None:
    reference, model = load(served), load(served)
    input_ids = prompts(seed=2)
    if hooked_before_patching:  # transformers installs its recording hooks on the first call that asks
        with torch.no_grad():
            model(input_ids, output_router_logits=True)
    patch_model(model, served.stack.address)
    with torch.no_grad():
        expected = reference(input_ids, output_router_logits=True)
        actual = model(input_ids, output_router_logits=True)
    num_tokens = PROMPT_SHAPE[0] * PROMPT_SHAPE[1]
    assert len(actual.router_logits) == len(expected.router_logits) == len(served.moe_layers)
    for served_logits, local_logits in zip(actual.router_logits, expected.router_logits, strict=True):
        assert served_logits.shape == local_logits.shape == (num_tokens, local_logits.shape[-1])
        assert served_logits.dtype == local_logits.dtype
        torch.testing.assert_close(served_logits, local_logits, rtol=TOLERANCE, atol=TOLERANCE)
    if expected.aux_loss is not None:  # the load-balancing loss is computed from the router logits
        torch.testing.assert_close(actual.aux_loss, expected.aux_loss, rtol=TOLERANCE, atol=TOLERANCE)


def test_patch_model_refuses_a_model_the_gateway_does_not_serve(fp32_stack: Stack) -> None:
    other_shape = MixtralForCausalLM(MixtralConfig(**{**TINY_MIXTRAL, "hidden_size": 32, "num_hidden_layers": 3}))
    with pytest.raises(ModelMismatch) as raised:
        patch_model(other_shape, fp32_stack.address, fp32_stack.model_name)
    assert "hidden size: served 64, local 32" in str(raised.value)
    assert "MoE layers: served [0, 1], local [0, 1, 2]" in str(raised.value)
    assert not any(isinstance(module, RemoteMoE) for module in other_shape.modules())

    same_shape = MixtralForCausalLM(MixtralConfig(**TINY_MIXTRAL))
    with pytest.raises(ModelMismatch, match=f"does not serve 'no-such-model'.*{fp32_stack.model_name}"):
        patch_model(same_shape, fp32_stack.address, "no-such-model")
    with pytest.raises(ValueError, match="pass model_name="):  # built from a config: no directory to name it
        patch_model(same_shape, fp32_stack.address)


def test_sync_client_round_trip_equals_transformers(
    fp32_stack: Stack, checkpoints: Callable[[torch.dtype], Path]
) -> None:
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    with MoEClient(fp32_stack.address) as client:
        metadata = client.model_metadata(fp32_stack.model_name)
        assert (metadata.name, metadata.hidden_size, metadata.family) == (fp32_stack.model_name, 64, "mixtral")
        assert (metadata.moe_layers, metadata.num_experts, metadata.top_k) == ((0, 1), 8, 2)
        for layer, num_tokens in ((0, 1), (1, 9), (1, 33)):
            hidden = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens))
            result = client.infer(
                fp32_stack.model_name, hidden, layer=layer, outputs=("output", "router_logits", "expert_ids")
            )
            output, logits, ids = reference_forward(blocks[layer], hidden)
            torch.testing.assert_close(result["output"], output, rtol=TOLERANCE, atol=TOLERANCE)
            torch.testing.assert_close(result["router_logits"], logits, rtol=TOLERANCE, atol=TOLERANCE)
            assert torch.equal(result["expert_ids"].long(), ids)
        batched = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
        assert client.infer(fp32_stack.model_name, batched, layer=1)["output"].shape == (2, 5, 64)


def test_sync_client_raises_gateway_error_with_the_status(fp32_stack: Stack) -> None:
    with MoEClient(fp32_stack.address) as client:
        with pytest.raises(GatewayError) as raised:
            client.infer(fp32_stack.model_name, torch.randn(3, 63), layer=0)  # hidden size is 64
        assert raised.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(raised.value).startswith("INVALID_ARGUMENT in ModelInfer: ")
        with pytest.raises(GatewayError) as raised:
            client.infer(fp32_stack.model_name, torch.randn(3, 64), layer=5)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GatewayError) as raised:
            client.model_metadata("no-such-model")
        assert raised.value.status_code == grpc.StatusCode.NOT_FOUND


def test_async_client_round_trip_and_errors(fp32_stack: Stack, checkpoints: Callable[[torch.dtype], Path]) -> None:
    blocks = reference_blocks(checkpoints(torch.float32), torch.float32)
    hidden = [torch.randn(4 + i, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    async def scenario() -> tuple[list[dict[str, torch.Tensor]], GatewayError, int]:
        async with AsyncMoEClient(fp32_stack.address) as client:
            metadata = await client.model_metadata(fp32_stack.model_name)
            concurrent = [
                client.infer(fp32_stack.model_name, states, layer=i % 2, outputs=("output", "expert_ids"))
                for i, states in enumerate(hidden)
            ]
            results = await asyncio.gather(*concurrent)
            with pytest.raises(GatewayError) as raised:
                await client.infer(fp32_stack.model_name, torch.randn(2, 10))
            return results, raised.value, metadata.hidden_size

    results, error, hidden_size = asyncio.run(scenario())
    assert hidden_size == 64
    for i, (states, result) in enumerate(zip(hidden, results, strict=True)):
        output, _, ids = reference_forward(blocks[i % 2], states)
        torch.testing.assert_close(result["output"], output, rtol=TOLERANCE, atol=TOLERANCE)
        assert torch.equal(result["expert_ids"].long(), ids)
    assert error.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "64" in error.message
