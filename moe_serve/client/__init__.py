"""`moe_serve.client` is the light client distribution `moe_serve_client` (clients/python), kept under
its old name so that existing code keeps working: `from moe_serve.client import MoEClient, patch_model`.
New code imports `moe_serve_client`, which installs without the server's dependencies.
"""

from __future__ import annotations

from typing import Any

import moe_serve_client
from moe_serve_client import AsyncMoEClient, GatewayError, MoEClient, ServedModelMetadata


def __getattr__(name: str) -> Any:
    # the torch-backed names (RemoteMoE, patch_model, ...) load on first use, as in moe_serve_client
    return getattr(moe_serve_client, name)


__all__ = ["AsyncMoEClient", "GatewayError", "MoEClient", "ServedModelMetadata", *moe_serve_client._TORCH_EXPORTS]
