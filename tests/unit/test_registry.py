"""Worker registry: in-process, and shared through the real Redis server (own key prefix per test)."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from dataclasses import replace

import grpc
import pytest
import redis.asyncio as aioredis
from grpc import aio

from expert_service.registration import RedisRegistration, RouterRegistration
from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.redis_keys import events_channel, worker_key
from moe_serve.registry_trust import RecordPolicy, RejectedRecord, signed_entry
from moe_serve.runtime.errors import InvalidInput
from moe_serve.runtime.security import ClusterCredentials
from moe_serve.worker_record import WorkerRecord
from router_service.redis_registry import RedisRegistry
from router_service.registry import InProcessRegistry, RegistryServicer
from tests.conftest import REDIS_URL


def record(worker_id: str, experts: list[int]) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        address=f"127.0.0.1:{1000 + len(worker_id)}",
        experts=tuple(ExpertKey(0, e) for e in experts),
        weights_version="0123456789abcdef",
        compute_datatype="FP32",
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


# ------------------------------------------------------------------ which records are routed to

KEY = b"record-key-of-this-test-cluster!"
VERSION = "0123456789abcdef"
MODEL_EXPERTS = frozenset(ExpertKey(layer, expert) for layer in (0, 1) for expert in range(8))


def policy(key: bytes | None = KEY) -> RecordPolicy:
    return RecordPolicy(MODEL_EXPERTS, VERSION, key)


def test_record_validation_names_what_is_wrong() -> None:
    good = record("a", [0, 1])
    assert policy().problems(good) == []
    bad = {
        "unresolvable address": replace(good, address="999.999.1.1:0"),
        "port out of range": replace(good, address="127.0.0.1:70000"),
        "no port": replace(good, address="127.0.0.1"),
        "spaces in host": replace(good, address="evil host:80"),
        "negative load": replace(good, load={"inflight_rows": -5.0}),
        "infinite load": replace(good, load={"queued_rows": math.inf}),
        "bogus version": replace(good, weights_version="v1"),
        "other weights": replace(good, weights_version="fedcba9876543210"),
        "unknown expert": replace(good, experts=(ExpertKey(0, 8),)),
        "no experts": replace(good, experts=()),
        "unknown datatype": replace(good, compute_datatype="FP64"),
        "bad metrics address": replace(good, metrics_address="nowhere"),
        "wrong field type": replace(good, load="lots"),  # type: ignore[arg-type]
    }
    for what, candidate in bad.items():
        assert policy().problems(candidate), what
    for host in ("worker-0", "gateway", "10.0.0.7", "[::1]", "::1", "moe_serve_worker_1", "w.cluster.local"):
        assert policy().problems(replace(good, address=f"{host}:8000")) == [], host
    # a registry not tied to one model checks the form only
    assert RecordPolicy().problems(replace(good, experts=(ExpertKey(5, 90),), weights_version="fedcba9876543210")) == []


def test_redis_entries_must_be_signed_by_this_cluster_and_fresh() -> None:
    good = record("a", [0])
    entry = signed_entry(good, KEY, ttl_s=10)
    assert policy().verify(entry, "a")[0] == good
    unsigned = signed_entry(good, None, ttl_s=10)
    other_cluster = signed_entry(good, b"another-cluster-record-key-here!", ttl_s=10)
    tampered = entry.replace("127.0.0.1", "127.0.0.2")
    old = signed_entry(good, KEY, ttl_s=10, now=time.time() - 3600)
    cases = {
        "unsigned": (unsigned, "a", "bad_signature"),
        "another cluster's key": (other_cluster, "a", "bad_signature"),
        "tampered after signing": (tampered, "a", "bad_signature"),
        "replayed long after": (old, "a", "expired"),
        "under another worker's key": (entry, "b", "invalid"),
        "a plain record (old format)": (good.to_json(), "a", "malformed"),
        "garbage": ("{not json", "a", "malformed"),
    }
    for what, (text, worker_id, reason) in cases.items():
        with pytest.raises(RejectedRecord) as rejected:
            policy().verify(text, worker_id)
        assert rejected.value.reason == reason, what
    # --insecure-internal: signatures are not checked, validity still is
    assert policy(key=None).verify(unsigned, "a")[0] == good
    with pytest.raises(RejectedRecord):
        policy(key=None).verify(signed_entry(replace(good, address="999.999.1.1:0"), None, 10), "a")


def test_router_hosted_registry_refuses_invalid_registrations() -> None:
    registry = InProcessRegistry(policy())
    servicer = RegistryServicer(registry)

    async def register(worker: WorkerRecord) -> None:
        await servicer.Register(moe_pb2.RegisterRequest(worker=worker.to_proto(), ttl_s=10), None)

    asyncio.run(register(record("a", [0])))
    with pytest.raises(InvalidInput, match="not experts of the served model"):
        asyncio.run(register(record("b", [9])))
    assert [r.worker_id for r in registry.workers()] == ["a"]
    assert registry.policy.rejected == {"invalid": 1}


def test_redis_registry_routes_only_to_valid_signed_entries(redis_prefix: str) -> None:
    """Forged, replayed and invalid entries are never routed to; an overwritten good entry keeps its
    worker in service until that entry's own signed expiry."""

    async def scenario() -> None:
        writer = aioredis.Redis.from_url(REDIS_URL)
        registry = RedisRegistry(REDIS_URL, redis_prefix, ttl_s=2.0, policy=policy())
        await registry.start()
        real = RedisRegistration(REDIS_URL, redis_prefix, lambda: record("real", [0, 1]), ttl_s=2.0, record_key=KEY)
        await real.start()
        await wait_until(lambda: [r.worker_id for r in registry.workers()] == ["real"], timeout_s=2.0)
        forged = {
            "rogue-unsigned": signed_entry(replace(record("rogue-unsigned", [0]), address="127.0.0.1:1"), None, 60),
            "rogue-address": signed_entry(replace(record("rogue-address", [0]), address="999.999.1.1:0"), KEY, 60),
            "rogue-load": signed_entry(replace(record("rogue-load", [0]), load={"inflight_rows": -1.0}), KEY, 60),
            "rogue-version": signed_entry(replace(record("rogue-version", [0]), weights_version="bogus"), KEY, 60),
            "rogue-garbage": "\x00\xff not a record",
        }
        for worker_id, value in forged.items():
            await writer.set(worker_key(redis_prefix, worker_id), value)
        # the real worker's own entry overwritten with a record claiming every expert at a dead address
        hijack = replace(record("real", list(range(8))), address="127.0.0.1:1")
        real._task.cancel()  # its heartbeat would repair the entry; this tests the router, not the worker
        await writer.set(worker_key(redis_prefix, "real"), signed_entry(hijack, None, 60))
        await writer.publish(events_channel(redis_prefix), "register rogue")
        await wait_until(lambda: sum(registry.policy.rejected.values()) >= len(forged) + 1, timeout_s=2.0)
        assert [(r.worker_id, r.address) for r in registry.workers()] == [("real", record("real", [0]).address)]
        assert registry.replicas(ExpertKey(0, 5)) == ()
        assert set(registry.policy.rejected) == {"bad_signature", "invalid", "malformed"}
        # past the good record's signed expiry (2 s) the worker is gone: nothing forged took its place
        await wait_until(lambda: registry.workers() == [], timeout_s=5.0)
        # the forged entries removed: nothing of them is remembered (a stranger's keys cannot grow it)
        await writer.delete(*(worker_key(redis_prefix, worker_id) for worker_id in [*forged, "real"]))
        await registry.refresh()
        assert registry._refusals == {}
        await real._client.aclose()
        await registry.close()
        await writer.aclose()

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


def test_a_worker_stopping_after_its_router_says_so_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """An embedded router stops with its gateway, before the workers: their deregistration finds no
    one listening, which is expected when a stack stops as a whole (INFO, not a WARNING per worker);
    a registry that answers with a refusal is still a warning."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"

    async def stop_after_the_router_is_gone() -> RouterRegistration:
        registration = RouterRegistration(address, lambda: record("w0", [0]), 5.0, ClusterCredentials(b"s" * 32))
        await registration.stop()
        return registration

    with caplog.at_level(logging.INFO, logger="expert_service.registration"):
        registration = asyncio.run(stop_after_the_router_is_gone())
    (logged,) = [r for r in caplog.records if "could not deregister" in r.getMessage()]
    assert logged.levelno == logging.INFO and "expires in 5 s" in logged.getMessage()
    refused = aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, aio.Metadata(), aio.Metadata(), "bad token")
    assert not registration._registry_gone(refused)
