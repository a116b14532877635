"""`moe-serve scale` and `moe-serve status`: act on a running stack through its deployment controller.

`moe-serve up` writes the cluster file (Ray address, controller name); these commands read it,
or take --ray-address and --controller explicitly (e.g. on another machine of the Ray cluster).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from moe_serve.registry import WorkerRecord

DEFAULT_CLUSTER_FILE = Path(".moe-serve/cluster.json")


@dataclass(frozen=True)
class ClusterInfo:
    ray_address: str
    controller: str
    namespace: str
    gateway: str
    router: str
    model: str
    # the 0600 file holding the stack's cluster secret, for tools that call its internal services
    secret_file: str = ""

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> ClusterInfo:
        if not path.is_file():
            raise FileNotFoundError(
                f"no cluster file at {path}: start the stack with `moe-serve up`, or pass "
                "--ray-address and --controller"
            )
        return cls(**json.loads(path.read_text()))


def connect(cluster_file: Path, ray_address: str | None, controller: str | None) -> Any:
    """The controller actor of the running stack."""
    if ray_address is None or controller is None:
        info = ClusterInfo.read(cluster_file)
        ray_address, controller = ray_address or info.ray_address, controller or info.controller
    use_ray_token_if_present()
    import ray

    from moe_serve.controller import NAMESPACE

    if not ray.is_initialized():
        ray.init(address=ray_address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
    return ray.get_actor(controller, namespace=NAMESPACE)


def use_ray_token_if_present() -> None:
    """Join token-authenticated clusters (Ray's default for local clusters) like `ray start` does: token
    mode when a token file exists and RAY_AUTH_MODE is not set. Must run before `import ray`."""
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def placement_table(status: dict[str, Any]) -> Table:
    """Worker, node, GPU, experts, live load; then replicas per expert."""
    table = Table(title=f"{status['model']}: placement (router {status['router']})")
    for column in ("worker", "node", "GPU", "experts (layer:expert)", "in flight", "queued", "rows/s", "p50 ms"):
        table.add_column(column, overflow="fold")  # never hide part of a worker id
    for text in status["workers"]:
        record = WorkerRecord.from_json(text)
        load = record.load
        table.add_row(
            record.worker_id,
            record.node_id[:12],
            str(record.gpu_id),
            compact_keys(record.experts),
            f"{load.get('inflight_rows', 0):.0f}",
            f"{load.get('queued_rows', 0):.0f}",
            f"{load.get('rows_per_s', 0):.0f}",
            f"{load.get('compute_p50_ms', 0):.2f}",
        )
    return table


def replicas_table(status: dict[str, Any]) -> Table:
    table = Table(title="replicas per expert")
    table.add_column("layer:expert")
    table.add_column("replicas")
    for key, count in sorted(status["replicas"].items(), key=lambda item: tuple(map(int, item[0].split(":")))):
        table.add_row(key, str(count))
    return table


def compact_keys(keys: tuple) -> str:
    """ "0:0-3 1:0-3" rather than eight pairs."""
    by_layer: dict[int, list[int]] = {}
    for key in keys:
        by_layer.setdefault(key.layer, []).append(key.expert)
    return " ".join(f"{layer}:{_ranges(sorted(experts))}" for layer, experts in sorted(by_layer.items()))


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for index, value in enumerate(values):
        if start is None:
            start = value
        if index + 1 == len(values) or values[index + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def print_status(console: Console, status: dict[str, Any]) -> None:
    console.print(placement_table(status))
    console.print(replicas_table(status))
    for event in status["events"]:
        console.print(f"  {event}")
