"""`moe-serve init-demo`: a small, deterministic, seeded random Mixtral-layout checkpoint.

Lets the stack run on a fresh machine with no download. The files are what `save_pretrained`
writes for the MoE part of a Mixtral model (`config.json` + `model.safetensors` with
`model.layers.N.block_sparse_moe.*`); attention and embedding weights are left out because
serving never reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_serve.model_spec import CONFIG_DTYPE_NAMES


@dataclass(frozen=True)
class DemoShape:
    hidden_size: int = 256
    intermediate_size: int = 512
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 2
    dtype: str = "float32"
    seed: int = 0


def demo_config(shape: DemoShape) -> dict[str, object]:
    """A config.json that transformers' MixtralConfig loads as is."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": max(1, shape.hidden_size // 64),
        "num_key_value_heads": max(1, shape.hidden_size // 128),
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "router_jitter_noise": 0.0,
        "vocab_size": 32000,
        "dtype": shape.dtype,
        # lets ensure_demo_checkpoint tell a differently seeded demo apart; transformers ignores it
        "moe_serve_demo_seed": shape.seed,
    }


def demo_weights(shape: DemoShape) -> dict[str, torch.Tensor]:
    """Seeded random MoE weights, scaled like a trained layer (unit-variance activations)."""
    generator = torch.Generator().manual_seed(shape.seed)
    dtype = CONFIG_DTYPE_NAMES[shape.dtype]
    d, d_ff = shape.hidden_size, shape.intermediate_size

    def normal(*size: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) / fan_in**0.5).to(dtype)

    weights: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        weights[f"{prefix}.gate.weight"] = normal(shape.num_experts, d, fan_in=d)
        for expert in range(shape.num_experts):
            weights[f"{prefix}.experts.{expert}.w1.weight"] = normal(d_ff, d, fan_in=d)
            weights[f"{prefix}.experts.{expert}.w3.weight"] = normal(d_ff, d, fan_in=d)
            weights[f"{prefix}.experts.{expert}.w2.weight"] = normal(d, d_ff, fan_in=d_ff)
    return weights


def write_demo_checkpoint(directory: str | Path, shape: DemoShape = DemoShape()) -> Path:
    """Write the checkpoint into `directory` (created if needed); return the directory."""
    if shape.dtype not in CONFIG_DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(CONFIG_DTYPE_NAMES)}, got {shape.dtype!r}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(demo_weights(shape), path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(demo_config(shape), indent=2) + "\n")
    return path


def ensure_demo_checkpoint(directory: str | Path, shape: DemoShape = DemoShape()) -> Path:
    """Reuse the checkpoint in `directory` if its config matches `shape`, else (re)write it."""
    path = Path(directory)
    config_path = path / "config.json"
    if config_path.is_file() and (path / "model.safetensors").is_file():
        try:
            if json.loads(config_path.read_text()) == demo_config(shape):
                return path
        except json.JSONDecodeError:
            pass
    return write_demo_checkpoint(path, shape)
