"""Faults of a Ray-managed stack: a worker actor killed under load, and Redis restarted under load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import ray
import redis
import torch

from moe_serve.config import UpSettings
from moe_serve.launcher import launch_stack
from tests.helpers import reference_blocks, save_tiny_mixtral
from tests.test_scaling import steady_load


def wait_for(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_killed_worker_actor_under_load_loses_no_request_and_comes_back(ray_cluster, tmp_path: Path) -> None:
    """4 experts on 2 workers, plus a dedicated replica of experts 0 and 1: kill the worker holding 0-1."""
    checkpoint = save_tiny_mixtral(tmp_path / "four-experts", num_local_experts=4)
    stack = launch_stack(UpSettings(port=0, workers=2, registry_ttl_s=3.0), checkpoint)
    try:
        for expert in (0, 1):
            ray.get(stack.controller.scale_expert.remote(expert, 2))
        block = reference_blocks(checkpoint, torch.float32)[0]
        victim = next(r for r in stack.workers if r.worker_id.endswith("-w0"))
        pid = ray.get(stack.controller.worker_pids.remote())[victim.worker_id]
        with steady_load(stack, block) as outcome:
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            # Ray restarts the actor; it registers again under the same id at a new address
            restarted = wait_for(
                lambda: any(r.worker_id == victim.worker_id and r.address != victim.address for r in stack.workers),
                timeout_s=60,
                what="restarted worker registered",
            )
            time.sleep(1.0)
        assert outcome["answered"] > 20
        assert outcome["failures"] == []  # every request answered, all exact (>= 99.9% asked)
        assert restarted < 60
        assert victim.address not in {r.address for r in stack.workers}
    finally:
        stack.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), 10, "redis-server up")
    return process


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_redis_restart_keeps_serving_and_workers_register_again(ray_cluster, checkpoints) -> None:
    port = free_port()
    server = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    stack = launch_stack(UpSettings(port=0, workers=2, redis_url=url, registry_ttl_s=3.0), checkpoints(torch.float32))
    try:
        block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
        client = redis.Redis(port=port)
        assert len(list(client.scan_iter("moe-serve:workers:*"))) == 2
        with steady_load(stack, block) as outcome:
            time.sleep(0.5)
            server.kill()
            server.wait()
            time.sleep(3.0)  # Redis down for a TTL: serving goes on from the last known placement
            answered_while_down = outcome["answered"]
            server = start_redis(port)  # back, empty
            wait_for(lambda: len(list(client.scan_iter("moe-serve:workers:*"))) == 2, 10, "workers re-registered")
            time.sleep(0.5)
        assert outcome["failures"] == []
        assert answered_while_down > 5
        assert len(stack.workers) == 2
    finally:
        stack.stop()
        server.kill()
