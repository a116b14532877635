"""Shared fixtures: one Ray instance per test session, tiny checkpoints, running stacks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch

from moe_serve.config import UpSettings
from moe_serve.launcher import Stack, init_ray, launch_stack
from tests.helpers import kserve_stub, save_tiny_mixtral

REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray instance for the whole run (starting Ray costs ~5 s)."""
    import ray

    context = init_ray(num_cpus=2)
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
            running[dtype] = launch_stack(UpSettings(port=0, workers=2), checkpoints(dtype))
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
