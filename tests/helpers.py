"""Test helpers: tiny transformers checkpoints, their reference MoE blocks, KServe request building."""

from __future__ import annotations

from pathlib import Path

import grpc
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_serve import codec
from moe_serve.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.families import rescale_moe_weights

TINY_MIXTRAL = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}


def save_tiny_mixtral(directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: int) -> Path:
    """Build a tiny Mixtral with transformers (no hub), save it with save_pretrained, return the directory."""
    torch.manual_seed(seed)
    config = MixtralConfig(**{**TINY_MIXTRAL, **overrides})
    model = MixtralForCausalLM(config)
    rescale_moe_weights(model, seed)
    model.to(dtype).save_pretrained(directory)
    return directory


def reference_blocks(directory: Path, dtype: torch.dtype) -> list[torch.nn.Module]:
    """The transformers MoE block of every layer, loaded by transformers from the saved files."""
    model = MixtralForCausalLM.from_pretrained(directory, dtype=dtype)
    model.eval()
    return [layer.mlp for layer in model.model.layers]


def reference_forward(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output [T, d], router_logits [T, E] float32, expert ids [T, k]) of the transformers block."""
    with torch.no_grad():
        output = block(hidden.unsqueeze(0)).reshape(hidden.shape)
        logits, _, ids = block.gate(hidden)
    return output, logits.float(), ids


def infer_request(
    model_name: str,
    hidden: torch.Tensor,
    layer: int | None = 0,
    outputs: tuple[str, ...] = (),
    shape: list[int] | None = None,
) -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(
        model_name=model_name,
        id="test",
        inputs=[
            kserve_pb2.ModelInferRequest.InferInputTensor(
                name="hidden_states",
                datatype=codec.datatype_name(hidden.dtype),
                shape=shape or list(hidden.shape),
            )
        ],
        outputs=[kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=[codec.tensor_to_bytes(hidden)],
    )
    if layer is not None:
        request.parameters["layer"].int64_param = layer
    return request


def response_tensors(response: kserve_pb2.ModelInferResponse) -> dict[str, torch.Tensor]:
    return {
        output.name: codec.tensor_from_bytes(raw, output.datatype, list(output.shape)).clone()
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def kserve_stub(address: str) -> tuple[grpc.Channel, kserve_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
    return channel, kserve_grpc.GRPCInferenceServiceStub(channel)
