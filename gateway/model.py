"""The model the gateway serves, as described by the router, and its public metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import codec
from moe_serve.runtime.errors import ModelNotFound, quoted

MODEL_VERSION = "1"
PLATFORM = "pytorch_moe"
INPUT_NAME = "hidden_states"
OUTPUT_NAME = "output"
# optional outputs, returned when asked for by name: name -> datatype
GATING_OUTPUTS = {
    "router_logits": "FP32",
    "expert_ids": "INT32",
    "expert_weights": "FP32",
    "dropped_mask": "BOOL",
}
ACCEPTED_INPUT_DATATYPES = codec.FLOAT_DATATYPES


@dataclass(frozen=True)
class ServedModel:
    """What the gateway needs to validate requests and describe the model."""

    name: str
    family: str
    hidden_size: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    num_layers: int
    compute_dtype: torch.dtype
    num_shared_slots: int = 0
    weights_in_activation_dtype: bool = False
    default_expert_capacity: int = 0

    @classmethod
    def from_info(cls, info: moe_pb2.ModelInfo, name: str | None = None) -> ServedModel:
        return cls(
            name=name or info.model_name,
            family=info.family,
            hidden_size=info.hidden_size,
            num_experts=info.num_experts,
            top_k=info.top_k,
            moe_layers=tuple(info.moe_layers),
            num_layers=info.num_layers,
            compute_dtype=codec.torch_dtype(info.compute_datatype),
            num_shared_slots=info.num_shared_slots,
            weights_in_activation_dtype=info.weights_in_activation_dtype,
            default_expert_capacity=info.default_expert_capacity,
        )

    @property
    def slots_per_token(self) -> int:
        return self.top_k + self.num_shared_slots

    @property
    def output_names(self) -> tuple[str, ...]:
        return (OUTPUT_NAME, *GATING_OUTPUTS)

    def check_name(self, name: str, version: str) -> None:
        """Raise ModelNotFound unless `name`/`version` address this model."""
        if name != self.name:
            raise ModelNotFound(f"model {quoted(name)} is not served here; this server serves {self.name!r}")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(
                f"model {quoted(name)} has no version {quoted(version)}; available versions: [{MODEL_VERSION!r}]"
            )

    def output_width(self, name: str) -> int:
        return {OUTPUT_NAME: self.hidden_size, "router_logits": self.num_experts}.get(name, self.top_k)
