"""Faults of a Ray-managed stack: a worker actor killed under load, and Redis restarted under load
(and, step by step, what a router's registry makes of Redis coming back empty)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import ray
import redis
import torch

from expert_service.actor import ExpertWorkerActor
from expert_service.registration import RedisRegistration
from moe_serve.cluster.launcher import launch_stack
from moe_serve.cluster.placement import ExpertKey
from moe_serve.config import UpSettings
from moe_serve.worker_record import WorkerRecord
from router_service.redis_registry import RedisRegistry
from tests.helpers import reference_blocks, save_tiny_mixtral, wait_until
from tests.integration.test_scaling import answered_more, steady_load


@pytest.mark.slow
def test_killed_worker_actor_under_load_loses_no_request_and_comes_back(ray_cluster, tmp_path: Path) -> None:
    """4 experts on 2 workers, plus a dedicated replica of experts 0 and 1: kill the worker holding 0-1."""
    checkpoint = save_tiny_mixtral(tmp_path / "four-experts", num_local_experts=4)
    stack = launch_stack(UpSettings(port=0, workers=2, registry_ttl_s=3.0), checkpoint, worker_actor=ExpertWorkerActor)
    try:
        for expert in (0, 1):
            ray.get(stack.controller.scale_expert.remote(expert, 2))
        block = reference_blocks(checkpoint, torch.float32)[0]
        victim = next(r for r in stack.workers if r.worker_id.endswith("-w0"))
        pid = ray.get(stack.controller.worker_pids.remote())[victim.worker_id]
        with steady_load(stack, block) as outcome:
            answered_more(outcome, 10, "answers before the kill")
            os.kill(pid, signal.SIGKILL)
            # Ray restarts the actor; it registers again under the same id at a new address
            restarted = wait_until(
                lambda: any(r.worker_id == victim.worker_id and r.address != victim.address for r in stack.workers),
                timeout_s=60,
                what="restarted worker registered",
                poll_s=0.1,
            )
            answered_more(outcome, outcome["answered"] + 10, "answers after the restart")
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
    wait_until(lambda: _pings(client), 10, "redis-server up")
    return process


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_redis_restart_keeps_serving_and_workers_register_again(ray_cluster, checkpoints, reliability_record) -> None:
    port = free_port()
    server = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    stack = launch_stack(
        UpSettings(port=0, workers=2, redis_url=url, registry_ttl_s=3.0),
        checkpoints(torch.float32),
        worker_actor=ExpertWorkerActor,
    )
    try:
        block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
        client = redis.Redis(port=port)
        assert len(list(client.scan_iter("moe-serve:workers:*"))) == 2
        with steady_load(stack, block) as outcome:
            answered_more(outcome, 5, "answers before Redis goes")
            answered_before = outcome["answered"]
            server.kill()
            server.wait()
            down_at = time.monotonic()
            time.sleep(3.0)  # Redis down for a TTL: serving goes on from the last known placement
            answered_while_down = outcome["answered"] - answered_before
            server = start_redis(port)  # back, empty
            down_s = time.monotonic() - down_at
            registered_again_s = wait_until(
                lambda: len(list(client.scan_iter("moe-serve:workers:*"))) == 2, 10, "workers re-registered", poll_s=0.1
            )
            answered_more(outcome, outcome["answered"] + 5, "answers after the workers registered again")
        assert outcome["failures"] == []
        assert answered_while_down > 5
        assert len(stack.workers) == 2
    finally:
        stack.stop()
        server.kill()
    reliability_record(
        "redis-restart",
        title="Redis (the registry) restarted under load",
        load="1 client back to back, T=24; 2 Ray worker actors registered in Redis (TTL 3 s)",
        faults="Redis killed, down 3 s (a TTL), restarted empty",
        succeeded=outcome["answered"],
        failed=len(outcome["failures"]),
        wrong_answers=0,
        recover_s=registered_again_s,
        expected_failures="",
        redis_down_s=down_s,
        answered_while_redis_down=answered_while_down,
        recover_s_measured_from="Redis back (empty) until both workers registered again",
    )


def test_router_registry_keeps_known_workers_for_a_ttl_when_redis_comes_back_empty() -> None:
    """Redis restarted without persistence comes back empty. The router keeps the workers it knew for
    one TTL (their entries would have lived that long) instead of an empty placement that fails every
    request until the next heartbeats; one that re-registers and then leaves goes at once, one that
    never comes back goes after the TTL."""
    ttl_s = 2.0
    port = free_port()
    server = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"

    def record(worker_id: str) -> WorkerRecord:
        return WorkerRecord(
            worker_id=worker_id,
            address=f"127.0.0.1:{port + 1}",
            experts=(ExpertKey(0, 0),),
            weights_version="0123456789abcdef",
            compute_datatype="FP32",
        )

    async def until_true(action) -> None:
        # the first command on a connection that Redis dropped fails; the next one reconnects
        for _ in range(50):
            if await action():
                return
            await asyncio.sleep(0.1)
        raise AssertionError("Redis did not answer")

    async def scenario() -> None:
        nonlocal server
        registry = RedisRegistry(url, "t:", ttl_s)
        registrations = {name: RedisRegistration(url, "t:", lambda name=name: record(name), ttl_s) for name in "ab"}
        for registration in registrations.values():
            await registration.publish()
        await until_true(registry.refresh)
        assert [r.worker_id for r in registry.workers()] == ["a", "b"]

        server.kill()
        server.wait()
        assert not await registry.refresh()  # unreachable: the last known state stays
        server = start_redis(port)  # back, empty
        await until_true(registry.refresh)
        assert [r.worker_id for r in registry.workers()] == ["a", "b"]

        await until_true(registrations["a"].publish)  # a's heartbeat registers it again
        await registry.refresh()
        await registrations["a"].stop()  # ... and then it leaves: gone at once
        await registry.refresh()
        assert [r.worker_id for r in registry.workers()] == ["b"]

        await asyncio.sleep(ttl_s)  # b never came back: dropped once its entry would have expired
        await registry.refresh()
        assert registry.workers() == []
        await registrations["b"]._close()
        await registry.close()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()
