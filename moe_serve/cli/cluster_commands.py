"""`moe-serve scale` and `moe-serve status`: act on a running stack through its deployment controller.

`moe-serve up` writes the cluster file (Ray address, controller name); these commands read it,
or take --ray-address and --controller explicitly (e.g. on another machine of the Ray cluster).
Every Ray call is bounded: when nothing listens at the cluster's address, or its raylet is dead,
Ray itself keeps retrying for minutes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from moe_serve.worker_record import WorkerRecord

DEFAULT_CLUSTER_FILE = Path(".moe-serve/cluster.json")
DEFAULT_TIMEOUT_S = 10.0
# a change starts workers and loads experts: each load may take the controller up to 120 s
DEFAULT_SCALE_TIMEOUT_S = 600.0
T = TypeVar("T")


class NoAnswer(Exception):
    """The Ray cluster or the controller did not answer in time; the message says what to check."""


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


@dataclass(frozen=True)
class Controller:
    """The controller actor of a running stack, with the bound on each call to it."""

    handle: Any
    name: str
    ray_address: str
    timeout_s: float

    def ask(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """`method(*args)` on the controller, within `timeout_s` (default: the connection's bound)."""
        import ray

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise NoAnswer(
                f"the controller {self.name!r} did not answer {method} within {timeout_s:g} s; is the Ray cluster "
                f"at {self.ray_address} healthy and the stack running? (`ray status --address {self.ray_address}`)"
            ) from None
        except ray.exceptions.RayActorError:
            raise NoAnswer(
                f"the controller {self.name!r} died during {method}; is the stack running? "
                f"(`ray list actors --address {self.ray_address}`)"
            ) from None


def connect(cluster_file: Path, ray_address: str | None, controller: str | None, timeout_s: float) -> Controller:
    """The controller actor of the running stack; NoAnswer when Ray does not answer within `timeout_s`."""
    if ray_address is None or controller is None:
        info = ClusterInfo.read(cluster_file)
        ray_address, controller = ray_address or info.ray_address, controller or info.controller
    use_ray_token_if_present()
    import ray

    from moe_serve.cluster.controller import NAMESPACE

    def join() -> Any:
        logging.getLogger("ray._private.worker").addFilter(_no_sigterm_handler_warning)
        if not ray.is_initialized():
            ray.init(address=ray_address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        return ray.get_actor(controller, namespace=NAMESPACE)

    try:
        handle = _within(timeout_s, join)
    except TimeoutError:
        raise NoAnswer(
            f"the Ray cluster at {ray_address} did not answer within {timeout_s:g} s; is it running? "
            f"(`ray status --address {ray_address}`)"
        ) from None
    return Controller(handle, controller, ray_address, timeout_s)


def _no_sigterm_handler_warning(record: logging.LogRecord) -> bool:
    """Drop Ray's warning that ray.init off the main thread installs no SIGTERM handler: these
    short-lived commands need none, and the warning would precede every answer."""
    return "SIGTERM handler is not set" not in record.getMessage()


def _within(timeout_s: float, call: Callable[[], T]) -> T:
    """`call()`'s result, or TimeoutError after `timeout_s` seconds.

    ray.init has no timeout and its connection retries run in C++, where no signal interrupts them:
    the call runs in a daemon thread that the process may leave behind when it exits.
    """
    outcome: Future[T] = Future()

    def run() -> None:
        try:
            outcome.set_result(call())
        except BaseException as error:
            outcome.set_exception(error)

    threading.Thread(target=run, name="ray-connect", daemon=True).start()
    return outcome.result(timeout=timeout_s)


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
