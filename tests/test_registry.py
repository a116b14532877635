"""Worker registry: in-process, and shared through the real Redis server (own key prefix per test)."""

from __future__ import annotations

import asyncio
import time

from moe_serve.placement import ExpertKey
from moe_serve.redis_registry import RedisRegistration, RedisRegistry
from moe_serve.registry import InProcessRegistry, WorkerRecord
from tests.conftest import REDIS_URL


def record(worker_id: str, experts: list[int]) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        address=f"127.0.0.1:{1000 + len(worker_id)}",
        experts=tuple(ExpertKey(0, e) for e in experts),
        weights_version="v1",
    )


async def wait_until(condition, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def test_router_hosted_registry_expires_workers_without_heartbeat() -> None:
    async def scenario() -> None:
        registry = InProcessRegistry()
        await registry.start()
        registry.register(record("a", [0]), ttl_s=0.3)
        registry.register(record("b", [1]), ttl_s=60)
        await asyncio.sleep(0.15)
        registry.register(record("a", [0]), ttl_s=0.3)  # a heartbeat keeps it
        await asyncio.sleep(0.2)
        assert [r.worker_id for r in registry.workers()] == ["a", "b"]
        elapsed = await wait_until(lambda: [r.worker_id for r in registry.workers()] == ["b"], timeout_s=1.0)
        assert elapsed < 0.6
        await registry.close()

    asyncio.run(scenario())


def test_load_updates_do_not_announce_a_placement_change() -> None:
    registry = InProcessRegistry()
    changes = []
    registry.add_listener(lambda: changes.append(1))
    registry.register(record("a", [0]))
    busy = WorkerRecord("a", record("a", [0]).address, (ExpertKey(0, 0),), load={"queued_rows": 40.0})
    registry.register(busy)
    assert registry.replicas(ExpertKey(0, 0))[0].load["queued_rows"] == 40.0
    assert len(changes) == 1


def test_in_process_registry_indexes_replicas() -> None:
    registry = InProcessRegistry()
    changes = []
    registry.add_listener(lambda: changes.append(1))
    registry.register(record("a", [0, 1]))
    registry.register(record("b", [1, 2]))
    assert [r.worker_id for r in registry.replicas(ExpertKey(0, 1))] == ["a", "b"]
    assert registry.covers([ExpertKey(0, e) for e in range(3)])
    registry.deregister("a")
    assert not registry.covers([ExpertKey(0, 0)])
    assert len(changes) == 3


def test_record_round_trips_through_json_and_proto() -> None:
    original = WorkerRecord(
        "w", "h:1", (ExpertKey(1, 3),), node_id="n", gpu_id=2, weights_version="x", compute_datatype="BF16"
    )
    assert WorkerRecord.from_json(original.to_json()) == original
    assert WorkerRecord.from_proto(original.to_proto()) == original


def test_redis_registry_follows_registrations_deregistrations_and_expiry(redis_prefix: str) -> None:
    async def scenario() -> None:
        registry = RedisRegistry(REDIS_URL, redis_prefix, ttl_s=1.0)
        await registry.start()
        first = RedisRegistration(REDIS_URL, redis_prefix, lambda: record("a", [0, 1]), ttl_s=1.0)
        second = RedisRegistration(REDIS_URL, redis_prefix, lambda: record("b", [2]), ttl_s=1.0)
        await first.start()
        await second.start()
        # announced on the events channel: visible well within a second
        seen_after = await wait_until(lambda: len(registry.workers()) == 2, timeout_s=1.0)
        assert seen_after < 1.0
        assert registry.replicas(ExpertKey(0, 2))[0].worker_id == "b"

        await first.stop()  # graceful: deleted and announced
        await wait_until(lambda: [r.worker_id for r in registry.workers()] == ["b"], timeout_s=1.0)

        # a crashed worker: heartbeats stop, nothing is announced; its entry expires by TTL
        second._task.cancel()
        await wait_until(lambda: registry.workers() == [], timeout_s=3.0)
        await second._client.aclose()
        await registry.close()

    asyncio.run(scenario())


def test_in_process_registry_tells_expiry_from_deregistration() -> None:
    async def scenario() -> None:
        registry = InProcessRegistry()
        seen: list[list[str]] = []
        registry.add_listener(lambda: seen.append([r.worker_id for r in registry.expired]))
        await registry.start()
        registry.register(record("a", [0]), ttl_s=0.3)
        registry.register(record("b", [1]), ttl_s=60)
        registry.deregister("b")
        await wait_until(lambda: not registry.workers(), timeout_s=2.0)
        assert seen == [[], [], [], ["a"]]
        await registry.close()

    asyncio.run(scenario())


def test_redis_registry_tells_expiry_from_deregistration(redis_prefix: str) -> None:
    async def scenario() -> None:
        registry = RedisRegistry(REDIS_URL, redis_prefix, ttl_s=1.0)
        seen: list[list[str]] = []
        registry.add_listener(lambda: seen.append([r.worker_id for r in registry.expired]))
        await registry.start()
        leaving = RedisRegistration(REDIS_URL, redis_prefix, lambda: record("a", [0]), ttl_s=1.0)
        crashing = RedisRegistration(REDIS_URL, redis_prefix, lambda: record("b", [1]), ttl_s=1.0)
        await leaving.start()
        await crashing.start()
        await wait_until(lambda: len(registry.workers()) == 2, timeout_s=2.0)
        await leaving.stop()
        await wait_until(lambda: [r.worker_id for r in registry.workers()] == ["b"], timeout_s=2.0)
        assert registry.expired == ()
        assert crashing._task is not None
        crashing._task.cancel()  # heartbeats stop; the entry expires
        await wait_until(lambda: registry.workers() == [], timeout_s=3.0)
        assert seen[-1] == ["b"] and all(not ids for ids in seen[:-1])
        await crashing._client.aclose()
        await registry.close()

    asyncio.run(scenario())
