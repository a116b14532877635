"""Where the registry lives in Redis: the names workers write, routers read and `top` follows.

Workers (expert_service.registration) write `<prefix>workers:<id>` with a TTL of about
`DEFAULT_TTL_S` and announce changes on `<prefix>events`; routers (router_service.redis_registry)
read the entries and subscribe to the channel; the gateway writes each model's live-state document
under `<prefix>live:<model>` for `moe-serve top`.
"""

from __future__ import annotations

DEFAULT_TTL_S = 10.0


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}workers:{worker_id}"


def events_channel(prefix: str) -> str:
    return f"{prefix}events"


def live_state_key(prefix: str, model: str) -> str:
    """Where the gateway writes a model's live-state document (gateway/live_state.py) for `top` to read."""
    return f"{prefix}live:{model}"
