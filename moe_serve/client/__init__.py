"""Client library for a moe-serve gateway, and drop-in remote experts for transformers models.

- `MoEClient` / `AsyncMoEClient`: KServe v2 gRPC calls (ModelMetadata, ModelInfer) returning torch tensors.
- `RemoteMoE`: an `nn.Module` standing in for one decoder layer's MoE block.
- `patch_model(model, url)`: swaps every MoE block of a Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 model.
"""

from moe_serve.client.clients import AsyncMoEClient, MoEClient
from moe_serve.client.patching import SUPPORTED_MODEL_TYPES, ModelMismatch, moe_layer_indices, patch_model
from moe_serve.client.protocol import GatewayError, ServedModelMetadata
from moe_serve.client.remote_moe import RemoteMoE

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AsyncMoEClient",
    "GatewayError",
    "MoEClient",
    "ModelMismatch",
    "RemoteMoE",
    "ServedModelMetadata",
    "moe_layer_indices",
    "patch_model",
]
