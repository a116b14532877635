"""The compose topology as local processes: `moe-serve worker` x N, `router` and `gateway`, Redis registry.

Each service is started exactly as a container of docker-compose.yml would start it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import torch

from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.placement import ExpertKey
from moe_serve.cluster.processes import ServiceProcess, start_service_process
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.redis_keys import events_channel, worker_key
from moe_serve.registry_trust import signed_entry
from moe_serve.worker_record import WorkerRecord
from tests.conftest import REDIS_URL
from tests.helpers import (
    infer_request,
    internal_channel,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
)


def start_all(specs: list[tuple[str, list[str]]]) -> list[ServiceProcess]:
    with ThreadPoolExecutor(len(specs)) as pool:
        return list(pool.map(lambda spec: start_service_process(*spec), specs))


def registered_workers(router_address: str) -> list[str]:
    with internal_channel(router_address) as channel:
        reply = moe_grpc.RouterStub(channel).ListWorkers(moe_pb2.ListWorkersRequest(), timeout=5)
    return sorted(worker.worker_id for worker in reply.workers)


def worker_addresses(router_address: str) -> dict[str, str]:
    with internal_channel(router_address) as channel:
        reply = moe_grpc.RouterStub(channel).ListWorkers(moe_pb2.ListWorkersRequest(), timeout=5)
    return {worker.worker_id: worker.address for worker in reply.workers}


def wait_for_workers(router_address: str, expected: list[str], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while registered_workers(router_address) != expected:
        assert time.monotonic() < deadline, f"router sees {registered_workers(router_address)}, want {expected}"
        time.sleep(0.05)


def assert_exact(address: str, model: str, block: torch.nn.Module, layer: int, seed: int) -> None:
    hidden = torch.randn(17, 64, generator=torch.Generator().manual_seed(seed))
    channel, stub = kserve_stub(address)
    with channel:
        result = response_tensors(stub.ModelInfer(infer_request(model, hidden, layer=layer), timeout=30))
    torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)


def forge_registry_entries(prefix: str, checkpoint: Path, overwrite: str) -> None:
    """Write what a stranger who can reach Redis might: every expert, at dead or impossible addresses."""
    every = tuple(ExpertKey(layer, expert) for layer in (0, 1) for expert in range(8))
    version = Checkpoint(checkpoint).fingerprint()

    def claim(worker_id: str, address: str = "127.0.0.1:1", **fields: object) -> WorkerRecord:
        return WorkerRecord(worker_id, address, every, weights_version=version, compute_datatype="FP32", **fields)

    entries = {
        "unsigned": signed_entry(claim("unsigned"), None, 600),
        "other-stack": signed_entry(claim("other-stack"), b"the record key of another stack!", 600),
        "bad-address": signed_entry(claim("bad-address", "999.999.1.1:0"), None, 600),
        "negative-load": signed_entry(claim("negative-load", load={"inflight_rows": -5.0}), None, 600),
        overwrite: signed_entry(claim(overwrite), None, 600),
    }
    client = redis.Redis.from_url(REDIS_URL)
    for worker_id, entry in entries.items():
        client.set(worker_key(prefix, worker_id), entry)
    client.publish(events_channel(prefix), "register unsigned")
    client.close()


def test_separate_processes_with_redis_registry(checkpoints, redis_prefix: str) -> None:
    checkpoint: Path = checkpoints(torch.float32)
    registry = ["--redis-url", REDIS_URL, "--redis-prefix", redis_prefix, "--registry-ttl", "2"]
    processes = start_all(
        [
            (
                f"worker-{index}",
                [
                    "worker",
                    "--checkpoint",
                    str(checkpoint),
                    "--worker-index",
                    str(index),
                    "--num-workers",
                    "2",
                    "--worker-id",
                    f"w{index}",
                    "--port",
                    "0",
                    *registry,
                ],
            )
            for index in range(2)
        ]
        + [("router", ["router", "--checkpoint", str(checkpoint), "--port", "0", *registry])]
    )
    try:
        router = processes[-1]
        gateway = start_service_process("gateway", ["gateway", "--router-address", router.address, "--port", "0"])
        processes.append(gateway)
        wait_for_workers(router.address, ["w0", "w1"])
        block = reference_blocks(checkpoint, torch.float32)[1]
        model = gateway.ready["model"]
        assert model == checkpoint.name
        assert_exact(gateway.address, model, block, layer=1, seed=1)

        # a stranger with write access to Redis: entries claiming every expert (unsigned, or signed with
        # another stack's key, or invalid), and w1's own entry overwritten; none is ever routed to
        addresses = worker_addresses(router.address)
        forge_registry_entries(redis_prefix, checkpoint, overwrite="w1")
        time.sleep(0.5)  # the router re-reads Redis at once on the announcement
        assert worker_addresses(router.address) == addresses
        for seed in range(100, 110):
            assert_exact(gateway.address, model, block, layer=1, seed=seed)

        # a worker added while serving takes part without restarting anything
        processes.append(
            start_service_process(
                "worker-2",
                [
                    "worker",
                    "--checkpoint",
                    str(checkpoint),
                    "--experts",
                    "0-7",
                    "--worker-id",
                    "w2",
                    "--port",
                    "0",
                    *registry,
                ],
            )
        )
        wait_for_workers(router.address, ["w0", "w1", "w2"], timeout_s=1.0)

        # SIGTERM: the worker deregisters, exits 0, and serving continues on the others
        assert processes[0].stop() == 0
        wait_for_workers(router.address, ["w1", "w2"], timeout_s=1.0)
        for seed in range(2, 6):
            assert_exact(gateway.address, model, block, layer=1, seed=seed)
    finally:
        for process in reversed(processes):
            process.stop()
