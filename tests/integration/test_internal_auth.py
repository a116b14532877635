"""A stranger inside the stack: a local process without the cluster secret tries every internal RPC.

The stack is the session's full stack (gateway and router processes, two Ray worker actors), started
the way `moe-serve up` starts it; clients keep sending requests, each checked against transformers,
while the rogue calls every method of every internal service and tries to register itself.
"""

from __future__ import annotations

import threading

import grpc
import torch

from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.launcher import Stack
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.security import ClusterCredentials, open_channel
from tests.helpers import infer_request, kserve_stub, reference_blocks, reference_forward, response_tensors
from tests.helpers import registered_worker_ids as registered

ANOTHER_CLUSTER = ClusterCredentials(b"the-secret-of-some-other-moe-serve-stack")


def internal_methods(stack: Stack) -> list[tuple[str, str, bool]]:
    """(address, method path, client streaming) of every RPC in proto/moe_serve.proto, where this stack serves it."""
    delivery = str(stack.gateway.ready["delivery_address"])
    hosts = {
        "Router": [stack.router.address],
        "WorkerRegistry": [stack.router.address],
        "ExpertWorker": [worker.address for worker in stack.workers],
        "GatewayAdmin": [delivery],
        "DeliveryService": [delivery],
    }
    methods = []
    for name, service in moe_pb2.DESCRIPTOR.services_by_name.items():
        for method in service.methods:
            for address in hosts[name]:
                methods.append((address, f"/{service.full_name}/{method.name}", method.client_streaming))
    return methods


def rogue_call(channel: grpc.Channel, method: str, streaming: bool) -> grpc.StatusCode:
    """Call `method` with a well-formed empty message; the status it ends with."""
    try:
        if streaming:
            for _ in channel.stream_stream(method)(iter([b""]), timeout=10):
                pass
        else:
            channel.unary_unary(method)(b"", timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_stranger_is_refused_everywhere_and_answers_stay_exact(fp32_stack: Stack, checkpoints) -> None:
    checkpoint = checkpoints(torch.float32)
    blocks = reference_blocks(checkpoint, torch.float32)
    workers_before = registered(fp32_stack.router.address)
    answered, wrong, failures, stop = [0], [0], [], threading.Event()

    def clients() -> None:
        channel, stub = kserve_stub(fp32_stack.address)
        with channel:
            seed = 0
            while not stop.is_set():
                seed += 1
                hidden = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
                try:
                    reply = stub.ModelInfer(infer_request(fp32_stack.model_name, hidden, layer=seed % 2), timeout=30)
                except grpc.RpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")
                    continue
                expected = reference_forward(blocks[seed % 2], hidden)[0]
                answered[0] += 1
                wrong[0] += not torch.allclose(response_tensors(reply)["output"], expected, rtol=1e-5, atol=1e-5)

    load = threading.Thread(target=clients, daemon=True)
    load.start()
    try:
        methods = internal_methods(fp32_stack)
        assert len(methods) == 20  # 5 router + 2 registry + 5 on each of 2 workers + 2 admin + 1 delivery
        refusals = {}
        for address, method, streaming in methods:
            with grpc.insecure_channel(address) as plain, open_channel(address, [], ANOTHER_CLUSTER) as other:
                refusals[(address, method, "no credentials")] = rogue_call(plain, method, streaming)
                refusals[(address, method, "another cluster's secret")] = rogue_call(other, method, streaming)
        assert set(refusals.values()) == {grpc.StatusCode.UNAUTHENTICATED}, {
            key: code.name for key, code in refusals.items() if code != grpc.StatusCode.UNAUTHENTICATED
        }
        # a well-formed registration claiming every expert, with the served weights' version
        spec = Checkpoint(checkpoint).spec
        claim = moe_pb2.WorkerInfo(
            worker_id="rogue",
            address="127.0.0.1:9",
            experts=[moe_pb2.ExpertKey(layer=layer, expert=e) for layer in spec.moe_layers for e in range(8)],
            weights_version=Checkpoint(checkpoint).fingerprint(),
            compute_datatype="FP32",
        )
        with grpc.insecure_channel(fp32_stack.router.address) as channel:
            try:
                moe_grpc.WorkerRegistryStub(channel).Register(
                    moe_pb2.RegisterRequest(worker=claim, ttl_s=0), timeout=10
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert "cluster" in error.details()  # says what the caller lacks
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert registered(fp32_stack.router.address) == workers_before
    finally:
        stop.set()
        load.join(60)
    assert answered[0] > 0 and wrong[0] == 0 and failures == [], (answered, wrong, failures[:3])
