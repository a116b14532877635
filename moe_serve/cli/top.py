"""`moe-serve top`: a live terminal view of a running stack, refreshed in place.

Reads the gateway's live-state document (see gateway/live_state.py) from Redis, where the
gateway writes it every second when it has a Redis URL, or straight from the gateway's internal
GatewayAdmin endpoint. Shows latency p50/p99 and throughput, the workers with their live load,
and per layer each expert's share of the rows as a bar, the max/mean imbalance and the drop rate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from moe_serve.cli.cluster_commands import compact_keys
from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.redis_keys import live_state_key
from moe_serve.runtime.security import ClusterCredentials, open_channel

BAR_WIDTH = 30
LiveSource = Callable[[], dict[str, Any] | None]


def redis_source(url: str, prefix: str, model: str) -> LiveSource:
    client = redis.Redis.from_url(url)
    key = live_state_key(prefix, model)

    def read() -> dict[str, Any] | None:
        text = client.get(key)
        return json.loads(text) if text else None

    return read


def gateway_source(address: str, credentials: ClusterCredentials) -> LiveSource:
    """Live state straight from the gateway's admin service (its internal port: mutual TLS when on)."""
    stub = moe_grpc.GatewayAdminStub(open_channel(address, [], credentials))

    def read() -> dict[str, Any] | None:
        return json.loads(stub.GetLiveState(moe_pb2.LiveStateRequest(), timeout=5).json)

    return read


def bar(share: float, peak: float) -> Text:
    filled = round(BAR_WIDTH * share / peak) if peak > 0 else 0
    return Text("█" * filled + "·" * (BAR_WIDTH - filled), style="cyan")


def render(document: dict[str, Any] | None) -> Group:
    """The whole view for one live-state document (or a waiting notice)."""
    if not document:
        return Group(Text("waiting for live state ... (is the gateway running, with the same model/prefix?)"))
    age = time.time() - document.get("updated_at", time.time())
    header = Text.assemble(
        (f"{document['model']}", "bold"),
        f"   p50 {document['p50_ms']:.1f} ms   p99 {document['p99_ms']:.1f} ms   "
        f"{document['requests_per_s']:.1f} req/s   {document['tokens_per_s']:.0f} tok/s   "
        f"{document['inflight_tokens']} tokens in flight   (window {document['window_s']:.0f} s, {age:.1f} s ago)",
    )
    workers = document.get("workers", [])
    offloading = [worker for worker in workers if worker.get("offload")]
    return Group(
        header,
        workers_table(workers),
        *([offload_table(offloading)] if offloading else []),
        *(layer_table(layer, view) for layer, view in document.get("layers", {}).items()),
    )


def offload_table(workers: list[dict[str, Any]]) -> Table:
    """Workers that offload experts: the device tier's resident set and what the cache did."""
    table = Table(title="expert offloading (device tier)", title_justify="left")
    for column in ("worker", "resident", "used / budget MiB", "hit rate", "misses", "moved MiB", "load s", "hinted"):
        table.add_column(column, overflow="fold")
    for worker in workers:
        state = worker["offload"]
        uses = state.get("hits", 0) + state.get("misses", 0)
        resident = tuple(ExpertKey(layer, expert) for layer, expert in state.get("resident", []))
        table.add_row(
            worker["worker_id"],
            compact_keys(resident) or "-",
            f"{state.get('resident_bytes', 0) / 2**20:.1f} / {state.get('budget_bytes', 0) / 2**20:.1f}",
            f"{state.get('hits', 0) / uses:.0%}" if uses else "-",
            str(state.get("misses", 0)),
            f"{state.get('bytes_moved', 0) / 2**20:.1f}",
            f"{state.get('load_seconds', 0):.2f}",
            str(state.get("prefetched", 0)),
        )
    return table


def workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(workers)} worker(s)", title_justify="left")
    for column in ("worker", "node", "GPU", "experts", "in flight", "queued", "rows/s", "p50 ms"):
        table.add_column(column, overflow="fold")
    for worker in workers:
        load = worker.get("load", {})
        keys = tuple(ExpertKey(layer, expert) for layer, expert in worker.get("experts", []))
        table.add_row(
            worker["worker_id"],
            str(worker.get("node_id", ""))[:12],
            str(worker.get("gpu_id", -1)),
            compact_keys(keys),
            f"{load.get('inflight_rows', 0):.0f}",
            f"{load.get('queued_rows', 0):.0f}",
            f"{load.get('rows_per_s', 0):.0f}",
            f"{load.get('compute_p50_ms', 0):.2f}",
        )
    return table


def layer_table(layer: str, view: dict[str, Any]) -> Table:
    shares = view["load_share"]
    peak = max(shares, default=0.0)
    table = Table(
        title=f"layer {layer}: {view['rows']} rows, imbalance {view['imbalance']:.2f}, "
        f"drop rate {view['drop_rate']:.1%}",
        title_justify="left",
    )
    table.add_column("expert", justify="right")
    table.add_column("load")
    table.add_column("share", justify="right")
    for expert, share in enumerate(shares):
        table.add_row(str(expert), bar(share, peak), f"{share:.1%}")
    return table


def run_top(source: LiveSource, console: Console, interval_s: float = 1.0, iterations: int | None = None) -> None:
    """Refresh the view in place every `interval_s` until interrupted (or `iterations` refreshes)."""
    count = 0
    with Live(
        render(source()), console=console, refresh_per_second=max(1, round(1 / interval_s)), screen=False
    ) as live:
        while iterations is None or count < iterations:
            time.sleep(interval_s)
            live.update(render(source()))
            count += 1
