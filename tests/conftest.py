"""Shared fixtures: one Ray instance per test session, tiny checkpoints, running stacks."""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from expert_service.actor import ExpertWorkerActor
from moe_serve.cluster.launcher import Stack, init_ray, launch_stack
from moe_serve.config import UpSettings
from moe_serve.runtime.security import CLUSTER_SECRET_ENV
from tests.helpers import ProcessStack, kserve_stub, save_tiny_mixtral, start_process_stack

REDIS_URL = "redis://127.0.0.1:6379/0"
HTTP_PORT_ENV = "MOE_SERVE_HTTP_PORT"
# Where reliability records go. A plain test run writes them to a temporary directory, so running
# tests never changes a tracked file; to refresh the committed records (and docs/reliability.md), run
# with MOE_SERVE_RELIABILITY_RESULTS=benchmarks/results/reliability.
RELIABILITY_RESULTS_ENV = "MOE_SERVE_RELIABILITY_RESULTS"


def pytest_configure(config: pytest.Config) -> None:
    """One cluster secret for every stack this run starts (they inherit it from the environment, as
    `moe-serve up`'s children do); tests call internal services with it (tests.helpers.internal_channel)."""
    os.environ.setdefault(CLUSTER_SECRET_ENV, f"moe-serve-tests-{secrets.token_hex(16)}")
    # every gateway and `up` this run starts serves REST on a free port, never the default 8000, so
    # runs and tests side by side never collide (settings and child processes read the variable)
    os.environ[HTTP_PORT_ENV] = "0"
    # metrics are on by default on fixed ports (8002, 8012, 8022): every service a test starts takes a
    # free one instead, so that concurrent services (and a stack someone runs beside) never collide
    os.environ.setdefault("MOE_SERVE_METRICS_PORT", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray instance for the whole run (starting Ray costs ~5 s): always a new one, never a
    cluster that ray.init would otherwise find (a stack someone runs beside, a stale
    /tmp/ray/ray_current_cluster), which fails with "num_cpus ... must not be provided"."""
    import ray

    context = init_ray("local", num_cpus=2)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[torch.dtype], Path]:
    """Tiny Mixtral checkpoints written by transformers' save_pretrained, one per dtype."""
    made: dict[torch.dtype, Path] = {}

    def get(dtype: torch.dtype) -> Path:
        if dtype not in made:
            name = f"tiny-mixtral-{str(dtype).removeprefix('torch.')}"
            made[dtype] = save_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / name, dtype=dtype)
        return made[dtype]

    return get


@pytest.fixture(scope="session")
def stacks(ray_cluster: str, checkpoints: Callable[[torch.dtype], Path]) -> Iterator[Callable[[torch.dtype], Stack]]:
    """Full stacks (gateway + router processes, 2 Ray worker actors), started once per dtype."""
    running: dict[torch.dtype, Stack] = {}

    def get(dtype: torch.dtype) -> Stack:
        if dtype not in running:
            running[dtype] = launch_stack(
                UpSettings(port=0, workers=2), checkpoints(dtype), worker_actor=ExpertWorkerActor
            )
        return running[dtype]

    yield get
    for stack in running.values():
        stack.stop()


@pytest.fixture(scope="session")
def fp32_stack(stacks: Callable[[torch.dtype], Stack]) -> Stack:
    return stacks(torch.float32)


@pytest.fixture
def fp32_client(fp32_stack: Stack) -> Iterator:
    channel, stub = kserve_stub(fp32_stack.address)
    yield stub
    channel.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis server; its keys are deleted afterwards."""
    prefix = f"moe-serve-test:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer tiny Mixtral whose experts are wide (d=64, d_ff=4096), so a large request keeps a
    worker's compute busy for a second or more: a request that stays in flight while a test acts."""
    return save_tiny_mixtral(
        tmp_path_factory.mktemp("ckpt") / "slow-mixtral", num_hidden_layers=1, intermediate_size=4096
    )


@pytest.fixture(scope="session")
def slow_stack(slow_checkpoint: Path) -> Iterator[ProcessStack]:
    """Router, one `moe-serve worker` holding every expert of `slow_checkpoint` and computing one
    segment at a time (--compute-threads 1), and a gateway; metrics on, and client shared memory
    (tests/integration/test_shared_memory_serving.py). A large request keeps the worker busy for seconds, so
    requests sent meanwhile stay in flight (tests.helpers.start_blocker)."""
    stack = start_process_stack(
        slow_checkpoint,
        [["--compute-threads", "1", "--metrics-port", "0"]],
        gateway_args=("--metrics-port", "0", "--allow-client-shm"),
    )
    yield stack
    stack.stop()


MESSAGE_LIMIT_BYTES = 65536  # a 255-token FP32 request of the tiny model fits, a 256-token one does not


@pytest.fixture(scope="session")
def limited_stack(checkpoints: Callable[[torch.dtype], Path]) -> Iterator[ProcessStack]:
    """Router, one worker (every expert) and a gateway of the tiny FP32 model, as processes, with
    --max-message-bytes MESSAGE_LIMIT_BYTES on every hop."""
    stack = start_process_stack(
        checkpoints(torch.float32), [[]], common=("--max-message-bytes", str(MESSAGE_LIMIT_BYTES))
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def reliability_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory reliability records are written to (see RELIABILITY_RESULTS_ENV)."""
    chosen = os.environ.get(RELIABILITY_RESULTS_ENV)
    return Path(chosen).resolve() if chosen else tmp_path_factory.mktemp("reliability")


@pytest.fixture
def reliability_record(request: pytest.FixtureRequest, reliability_results: Path) -> Callable[..., Path]:
    """Record one scenario's figures as a row of docs/reliability.md.

    Returns `record`, to be called once at the end of the test, after its assertions (so a failing
    run never replaces a good record)::

        record(
            scenario: str,             # file stem: <reliability_results>/<scenario>.json
            *,
            title: str,                # the table's "scenario" column
            load: str,                 # load held during the fault, e.g. "4 clients back to back, T=24"
            faults: str,               # what was injected, e.g. "SIGTERM to the gateway mid-request"
            succeeded: int,            # requests answered OK
            failed: int,               # requests answered with an error status, expected ones included
            wrong_answers: int,        # OK answers that differ from the reference (must be 0)
            recover_s: float | None,   # seconds from the fault to the next correct answer; None: n/a
            expected_failures: str = "",   # why `failed` is by design, e.g. "RESOURCE_EXHAUSTED (admission)"
            **figures: float | int | str,  # further measured figures, listed in the details column
        ) -> Path                      # the file written (overwritten on every run)

    `scripts/reliability_report.py` renders every such file into docs/reliability.md.
    """

    def record(
        scenario: str,
        *,
        title: str,
        load: str,
        faults: str,
        succeeded: int,
        failed: int,
        wrong_answers: int,
        recover_s: float | None,
        expected_failures: str = "",
        **figures: Any,
    ) -> Path:
        reliability_results.mkdir(parents=True, exist_ok=True)
        path = reliability_results / f"{scenario}.json"
        document = {
            "scenario": scenario,
            "title": title,
            "load": load,
            "faults": faults,
            "succeeded": int(succeeded),
            "failed": int(failed),
            "wrong_answers": int(wrong_answers),
            "recover_s": None if recover_s is None else round(float(recover_s), 3),
            "expected_failures": expected_failures,
            "figures": {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
            "test": request.node.nodeid,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu_cores": os.cpu_count(),
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        return path

    return record
