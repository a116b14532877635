"""Checkpoint reader: transformers' own files (single and sharded), the fused layout, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_serve.checkpoint import Checkpoint
from moe_serve.cli.demo import DemoShape, write_demo_checkpoint
from moe_serve.runtime.errors import ConfigurationError
from tests.helpers import reference_blocks, save_tiny_mixtral


def expected_expert(block: torch.nn.Module, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    return block.experts.gate_up_proj[expert].detach(), block.experts.down_proj[expert].detach()


@pytest.mark.parametrize("shard", [False, True])
def test_reads_what_save_pretrained_wrote(tmp_path: Path, shard: bool) -> None:
    directory = tmp_path / "tiny"
    save_tiny_mixtral(directory)
    if shard:  # re-save in several shards with an index, as large checkpoints come
        from transformers import MixtralForCausalLM

        MixtralForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
        directory = tmp_path / "sharded"
        assert (directory / "model.safetensors.index.json").is_file()

    checkpoint = Checkpoint(directory)
    blocks = reference_blocks(directory, torch.float32)

    spec = checkpoint.spec
    assert (spec.hidden_size, spec.expert.intermediate_size, spec.num_experts, spec.top_k) == (64, 96, 8, 2)
    assert spec.moe_layers == (0, 1) and spec.dtype == torch.float32 and spec.routing.family == "mixtral"
    for layer in (0, 1):
        assert torch.equal(checkpoint.router_weights(layer).gate, blocks[layer].gate.weight.detach())
        for expert in (0, 5):
            weights = checkpoint.expert_weights(layer, expert)
            gate_up, down = expected_expert(blocks[layer], expert)
            assert torch.equal(weights.up, gate_up) and torch.equal(weights.down, down)


def test_reads_fused_expert_layout_and_torch_dtype_key(tmp_path: Path) -> None:
    d, d_ff, experts = 8, 12, 3
    gate_up = torch.randn(experts, 2 * d_ff, d)
    down = torch.randn(experts, d, d_ff)
    save_file(
        {
            "model.layers.0.mlp.gate.weight": torch.randn(experts, d),
            "model.layers.0.mlp.experts.gate_up_proj": gate_up,
            "model.layers.0.mlp.experts.down_proj": down,
        },
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mixtral",
                "hidden_size": d,
                "intermediate_size": d_ff,
                "num_local_experts": experts,
                "num_experts_per_tok": 2,
                "num_hidden_layers": 1,
                "torch_dtype": "bfloat16",
            }
        )
    )
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.spec.dtype == torch.bfloat16
    weights = checkpoint.expert_weights(0, 2)
    assert torch.equal(weights.up, gate_up[2]) and torch.equal(weights.down, down[2])


def test_demo_checkpoint_is_deterministic_and_loads_in_transformers(tmp_path: Path) -> None:
    shape = DemoShape(hidden_size=32, intermediate_size=48, num_experts=4, num_layers=1, seed=3)
    first = Checkpoint(write_demo_checkpoint(tmp_path / "a", shape))
    second = Checkpoint(write_demo_checkpoint(tmp_path / "b", shape))
    assert torch.equal(first.expert_weights(0, 3).up, second.expert_weights(0, 3).up)
    assert first.fingerprint() == second.fingerprint()

    from transformers import MixtralConfig

    config = MixtralConfig.from_pretrained(tmp_path / "a")
    assert (config.hidden_size, config.num_local_experts, config.num_experts_per_tok) == (32, 4, 2)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "not a supported MoE family"),
        (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors"),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "cohere2_moe", "expert_selection_fn": "relu"}'),
            "expert_selection_fn 'relu' is not softmax or sigmoid",
        ),
        (
            lambda d: (d / "config.json").write_text(
                '{"model_type": "cohere2_moe", "num_shared_experts": 1, "shared_expert_combination_strategy": "max"}'
            ),
            "shared_expert_combination_strategy 'max' is not sum or average",
        ),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "ernie4_5_moe", "use_bias": true}'),
            "use_bias=true",
        ),
    ],
)
def test_bad_checkpoints_fail_at_start_with_a_clear_message(tmp_path: Path, mutate, message: str) -> None:
    directory = write_demo_checkpoint(
        tmp_path / "demo", DemoShape(hidden_size=16, intermediate_size=16, num_experts=2, num_layers=1)
    )
    mutate(directory)
    with pytest.raises(ConfigurationError, match=message.replace("*", r"\*")):
        Checkpoint(directory)


def test_missing_expert_weights_are_reported(tmp_path: Path) -> None:
    directory = write_demo_checkpoint(
        tmp_path / "demo", DemoShape(hidden_size=16, intermediate_size=16, num_experts=2, num_layers=1)
    )
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ConfigurationError, match="not all 2 experts' weights"):
        Checkpoint(directory)


def test_loaded_experts_own_their_memory_and_are_not_copied_twice(tmp_path: Path) -> None:
    """Experts read for a worker outlive the checkpoint's memory map, and weights already in the
    compute dtype are kept as read (one copy per load), while a shared host-tier copy is copied."""
    from expert_service.experts import materialise

    checkpoint = Checkpoint(save_tiny_mixtral(tmp_path / "tiny"))
    raw = checkpoint.expert_weights(1, 3)
    expected_up, expected_down = raw.up.clone(), raw.down.clone()
    checkpoint.close()  # unmaps the files: the expert's tensors must not point into them
    owned = materialise(raw, torch.float32, torch.device("cpu"), owned=True)
    assert owned.up.data_ptr() == raw.up.data_ptr() and owned.down.data_ptr() == raw.down.data_ptr()
    assert torch.equal(owned.up, expected_up) and torch.equal(owned.down, expected_down)
    shared = materialise(raw, torch.float32, torch.device("cpu"))
    assert shared.up.data_ptr() != raw.up.data_ptr() and torch.equal(shared.up, expected_up)
    converted = materialise(raw, torch.bfloat16, torch.device("cpu"), owned=True)
    assert converted.up.dtype == torch.bfloat16 and torch.equal(converted.up, expected_up.bfloat16())
