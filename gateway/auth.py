"""Bearer-token authentication and per-model authorization on the public port.

A call carries `authorization: Bearer <token>` metadata (what KServe, vLLM and OpenAI-style
clients send). No or an unknown token: UNAUTHENTICATED, before the request is even decoded. A
known token lacking the requested model: PERMISSION_DENIED (also for models that do not exist,
so a restricted token cannot probe which models do). grpc.health.v1 and reflection stay open for
orchestrator probes. Tokens are kept as SHA-256 digests and never logged; logs name the token's
`name` from the tokens file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from moe_serve.runtime.errors import quoted
from moe_serve.runtime.security import CallerCheck, refusal_handler

logger = logging.getLogger(__name__)
ALL_MODELS = "*"


@dataclass(frozen=True)
class Grant:
    name: str
    models: frozenset[str]

    def allows(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Known tokens (by digest) and the models each may use."""

    def __init__(self, grants: dict[bytes, Grant]) -> None:
        self._grants = grants

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Read {"tokens": [{"name": ..., "token": ..., "models": [...]}]}; errors never echo a token."""
        try:
            document = json.loads(Path(path).read_text())
            entries = document["tokens"]
            grants: dict[bytes, Grant] = {}
            for index, entry in enumerate(entries):
                token, models = entry["token"], entry.get("models", [ALL_MODELS])
                if not isinstance(token, str) or not token or not isinstance(models, list):
                    raise ValueError(f"entry {index} needs a non-empty string 'token' and a list 'models'")
                grants[_digest(token)] = Grant(str(entry.get("name", f"token-{index}")), frozenset(map(str, models)))
        except OSError as error:
            raise ValueError(f"cannot read the tokens file {path}: {error.strerror}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f'tokens file {path} is not {{"tokens": [{{"token": ..., "models": [...]}}]}}: {error}'
            ) from None
        return cls(grants)

    def grant_for(self, token: str) -> Grant | None:
        return self._grants.get(_digest(token))

    def __len__(self) -> int:
        return len(self._grants)


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


# requests whose `name` is a shared-memory region, not a model: regions are one namespace, as in
# Triton, which any valid token may manage; an inference using a region still needs the model's grant
REGION_REQUESTS = ("SystemSharedMemory", "CudaSharedMemory")


def requested_model(request: Any) -> str | None:
    """The model a KServe request names (ModelInfer: model_name; ModelMetadata/ModelReady: name)."""
    if hasattr(request, "DESCRIPTOR") and request.DESCRIPTOR.name.startswith(REGION_REQUESTS):
        return None
    for field in ("model_name", "name"):
        if hasattr(request, "DESCRIPTOR") and field in request.DESCRIPTOR.fields_by_name:
            return str(getattr(request, field))
    return None


class BearerTokenInterceptor(CallerCheck):
    """Checks the bearer token of every call (but health and reflection), then the model it names."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    def check(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        token = bearer_token(details.invocation_metadata)
        grant = self.tokens.grant_for(token) if token else None
        if grant is None:
            reason = "an unknown bearer token" if token else "no 'authorization: Bearer <token>' metadata"
            return refusal_handler(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{details.method} needs a valid bearer token; the call had {reason}",
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _authorized(handler.unary_unary, grant, details.method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _authorized_stream(handler.stream_stream, grant, details.method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _authorized(unary: Callable[..., Awaitable[Any]], grant: Grant, method: str) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: aio.ServicerContext) -> Any:
        await _check_model(request, grant, method, context)
        return await unary(request, context)

    return call


async def _check_model(request: Any, grant: Grant, method: str, context: aio.ServicerContext) -> None:
    """Abort with PERMISSION_DENIED when `request` names a model `grant` does not cover (an empty
    name, as in ModelStatistics for every model, needs a token for every model)."""
    model = requested_model(request)
    if model is None or grant.allows(model):
        return
    logger.info("token %r refused for model %r (%s)", grant.name, model, method)
    wanted = f"model {quoted(model)}" if model else "every model (name the model)"
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token does not grant access to {wanted}")


def _authorized_stream(
    streaming: Callable[..., Awaitable[None]], grant: Grant, method: str
) -> Callable[..., Awaitable[None]]:
    """Every request of the stream is checked as it arrives; one naming a model the token does not
    grant ends the stream with PERMISSION_DENIED."""

    async def call(requests: AsyncIterator[Any], context: aio.ServicerContext) -> None:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                await _check_model(request, grant, method, context)
                yield request

        await streaming(checked(), context)

    return call
