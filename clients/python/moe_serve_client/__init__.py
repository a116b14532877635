"""Client library for a moe-serve gateway, and drop-in remote experts for transformers models.

- `MoEClient` / `AsyncMoEClient`: KServe v2 gRPC calls (ModelMetadata, ModelInfer); tensors in and out
  (torch tensors, or numpy arrays where torch is not installed).
- `RemoteMoE`: an `nn.Module` standing in for one decoder layer's MoE block (needs torch).
- `patch_model(model, url)`: swaps every MoE block of a Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 model
  (needs torch).

Needs grpcio, protobuf and numpy only; the torch pieces are imported on first use (PEP 562), so
`import moe_serve_client` works without torch.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from moe_serve_client.clients import AsyncMoEClient, MoEClient
from moe_serve_client.protocol import GatewayError, ServedModelMetadata

if TYPE_CHECKING:
    from moe_serve_client.patching import SUPPORTED_MODEL_TYPES, ModelMismatch, moe_layer_indices, patch_model
    from moe_serve_client.remote_moe import RemoteMoE

try:
    __version__ = version("moe-serve-client")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# name -> module of the pieces that need torch
_TORCH_EXPORTS = {
    "RemoteMoE": "moe_serve_client.remote_moe",
    "SUPPORTED_MODEL_TYPES": "moe_serve_client.patching",
    "ModelMismatch": "moe_serve_client.patching",
    "moe_layer_indices": "moe_serve_client.patching",
    "patch_model": "moe_serve_client.patching",
}


def __getattr__(name: str) -> Any:
    module = _TORCH_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(import_module(module), name)
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ImportError(
            f"moe_serve_client.{name} needs torch: pip install 'moe-serve-client[torch]' (or torch itself)"
        ) from None


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AsyncMoEClient",
    "GatewayError",
    "MoEClient",
    "ModelMismatch",
    "RemoteMoE",
    "ServedModelMetadata",
    "__version__",
    "moe_layer_indices",
    "patch_model",
]
