"""Triton's system shared-memory extension on a running stack (the session's slow_stack: router, one
worker computing one segment at a time and a gateway with --allow-client-shm, each its own process):
NVIDIA's tritonclient end to end, the bad-input matrix, a region unregistered while a request uses
it, a client killed while holding a region, and no descriptor or segment left behind."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from moe_serve.runtime import codec
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import RequestedOutput, SharedMemory
from tests.helpers import (
    CLIENT_SCRIPTS,
    REPOSITORY,
    ProcessStack,
    gateway_stats,
    infer_request,
    kserve_stub,
    reference_blocks,
    response_tensors,
    start_blocker,
    wait_until,
)

CLIENT_SCRIPT = CLIENT_SCRIPTS / "triton_shm_check.py"
SHM_DIRECTORY = Path("/dev/shm")
REPEATS = 1000
INVALID, NOT_FOUND = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"


@pytest.fixture
def shm_stack(slow_stack: ProcessStack) -> ProcessStack:
    """The wide-expert one-layer model (a large request keeps its one compute thread busy for seconds,
    tests.helpers.start_blocker), served by a gateway that lets clients register shared memory."""
    return slow_stack


@pytest.fixture
def client(shm_stack: ProcessStack) -> Iterator:
    channel, stub = kserve_stub(shm_stack.address)
    yield stub
    stub.SystemSharedMemoryUnregister(kserve_pb2.SystemSharedMemoryUnregisterRequest(), timeout=10)
    channel.close()


@pytest.fixture
def segment() -> Iterator[Callable[[int], tuple[str, mmap.mmap]]]:
    """Shared-memory objects of this test (created with os calls, not multiprocessing, whose resource
    tracker would unlink them behind the test's back), unlinked afterwards."""
    made: list[tuple[Path, mmap.mmap]] = []

    def make(size: int) -> tuple[str, mmap.mmap]:
        path = SHM_DIRECTORY / f"moe_serve_test_{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        view = mmap.mmap(fd, size)
        os.close(fd)
        made.append((path, view))
        return f"/{path.name}", view

    yield make
    for path, view in made:
        view.close()
        path.unlink(missing_ok=True)


def gateway_shm_descriptors(stack: ProcessStack) -> list[str]:
    """The gateway's open descriptors and mappings into /dev/shm (what it holds of clients' objects)."""
    pid = stack.gateway.process.pid
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(str(SHM_DIRECTORY)):
            held.append(target)
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return held + [line for line in maps if str(SHM_DIRECTORY) in line]


def register(stub, name: str, key: str, byte_size: int, offset: int = 0) -> None:
    request = kserve_pb2.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)
    stub.SystemSharedMemoryRegister(request, timeout=10)


def shm_request(model: str, hidden: torch.Tensor, in_region: str, out_region: str) -> kserve_pb2.ModelInferRequest:
    size = hidden.numel() * 4
    output = RequestedOutput("output", SharedMemory(out_region, size))
    return infer_request(model, hidden, outputs=(output,), input_shared_memory=SharedMemory(in_region, size))


def test_tritonclient_through_shared_memory(shm_stack: ProcessStack, slow_checkpoint: Path, tmp_path: Path) -> None:
    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(11))
    np.save(tmp_path / "input.npy", hidden.numpy())
    segments_before = set(os.listdir(SHM_DIRECTORY))
    assert gateway_shm_descriptors(shm_stack) == []
    subprocess.run(
        [
            sys.executable,
            str(CLIENT_SCRIPT),
            shm_stack.address,
            shm_stack.model,
            str(tmp_path / "input.npy"),
            str(tmp_path),
            str(REPEATS),
        ],
        check=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "result.json").read_text())
    assert "system_shared_memory" in report["extensions"]

    # exactly the answer of the same request sent in the message, and the transformers module's
    for name in ("output", "logits", "ids"):
        np.testing.assert_array_equal(np.load(tmp_path / f"shm_{name}.npy"), np.load(tmp_path / f"raw_{name}.npy"))
    with torch.no_grad():
        expected = reference_blocks(slow_checkpoint, torch.float32)[0](hidden).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "shm_output.npy"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "streamed.npy"), np.load(tmp_path / "raw_output.npy"))
    assert report["stream_error"] is None
    # as Triton: an output in shared memory keeps its (empty) place in raw_output_contents
    assert report["raw_output_contents"][0] == 0 and report["raw_output_contents"][2] == 0
    assert report["raw_output_contents"][1] == 12 * 8 * 4  # router_logits [T, E] FP32, in the message
    output_parameters = report["output_parameters"]
    assert output_parameters["output"]["shared_memory_region"] == {"string_param": "output_data"}
    assert output_parameters["output"]["shared_memory_byte_size"] == {"int64_param": str(hidden.numel() * 4)}
    assert output_parameters["expert_ids"]["shared_memory_offset"] == {"int64_param": str(hidden.numel() * 4)}
    assert output_parameters["router_logits"] == {}

    regions = report["status"]["regions"]
    assert set(regions) == {"input_data", "output_data"}
    assert regions["input_data"]["byte_size"] == str(hidden.numel() * 4)
    assert regions["input_data"]["key"].startswith("/moe_serve_test_in_")
    assert set(report["status_one"]["regions"]) == {"input_data"}

    errors = report["errors"]
    expected_errors = {
        "unknown key": ("StatusCode.NOT_FOUND", "no such shared-memory object"),
        "duplicate name": ("StatusCode.ALREADY_EXISTS", "'input_data' already in manager"),
        "beyond the segment": (INVALID, "= 3073 bytes, but shared-memory object"),
        "offset beyond the segment": (INVALID, "offset 4 + byte_size 3072"),
        "input byte size mismatch": (
            INVALID,
            "'shared_memory_byte_size' is 3068, but its shape and datatype need 3072",
        ),
        "input outside the region": (INVALID, "3072 bytes at offset 4 of shared-memory region 'input_data'"),
        "unknown input region": (NOT_FOUND, "Unable to find shared memory region: 'nowhere'"),
        "output region too small": (INVALID, "output 'output' (3068 bytes) should be at least 3072 bytes"),
        "status of an unknown name": (NOT_FOUND, "'nowhere'"),
        "cuda register": ("StatusCode.UNIMPLEMENTED", "CUDA shared memory is not offered"),
        "cuda status": ("StatusCode.UNIMPLEMENTED", "no GPU"),
    }
    for case, (status, phrase) in expected_errors.items():
        assert errors[case] is not None, case
        assert errors[case]["status"] == status, (case, errors[case])
        assert phrase in errors[case]["message"], (case, errors[case])
    assert errors["unregister an unknown name"] is None  # as Triton: nothing to do is no error
    assert all(report["served_after"].values()), report["served_after"]

    assert report["repeats"] == REPEATS and report["mismatches"] == 0 and report["failures"] == []
    slots = {f"{side}{slot}" for side in ("in", "out") for slot in range(8)}
    assert set(report["status_after_one"]["regions"]) == {"output_data", *slots}
    assert report["status_after_all"] == {}
    # the gateway holds nothing of the client's objects any more, and left no object of its own
    assert gateway_shm_descriptors(shm_stack) == []
    assert set(os.listdir(SHM_DIRECTORY)) <= segments_before


def test_input_in_a_region_and_in_the_message_is_refused(shm_stack: ProcessStack, client, segment) -> None:
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    key, view = segment(hidden.numel() * 4)
    view[:] = codec.tensor_to_bytes(hidden)
    register(client, "both", key, hidden.numel() * 4)
    request = shm_request(shm_stack.model, hidden, "both", "both")
    request.raw_input_contents.append(codec.tensor_to_bytes(hidden))
    with pytest.raises(grpc.RpcError) as raised:
        client.ModelInfer(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names shared-memory region 'both' and also sends contents" in raised.value.details()
    # and the region works when used one way only (input and output in the same region)
    client.ModelInfer(shm_request(shm_stack.model, hidden, "both", "both"), timeout=30)
    reference = response_tensors(client.ModelInfer(infer_request(shm_stack.model, hidden), timeout=30))["output"]
    assert torch.equal(codec.tensor_from_bytes(bytes(view), "FP32", [3, 64]), reference)


def test_unregister_while_a_request_uses_the_region(shm_stack: ProcessStack, client, segment) -> None:
    """As Triton: Unregister succeeds at once, the request in flight still reads and writes its region,
    and the gateway lets go of the object when that request is answered."""
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    expected = response_tensors(client.ModelInfer(infer_request(shm_stack.model, hidden), timeout=30))["output"]
    key, view = segment(hidden.numel() * 4)
    view[:] = codec.tensor_to_bytes(hidden)
    register(client, "busy", key, hidden.numel() * 4)
    _, blocker = start_blocker(client, shm_stack.model, shm_stack.workers[0].address)
    in_flight = client.ModelInfer.future(shm_request(shm_stack.model, hidden, "busy", "busy"), timeout=120)
    wait_until(lambda: gateway_stats(shm_stack.delivery_address).inflight_requests == 2, 10, "both in flight")
    client.SystemSharedMemoryUnregister(kserve_pb2.SystemSharedMemoryUnregisterRequest(name="busy"), timeout=10)
    status = client.SystemSharedMemoryStatus(kserve_pb2.SystemSharedMemoryStatusRequest(), timeout=10)
    assert "busy" not in status.regions
    assert not in_flight.done(), "the request finished before the region was unregistered: no test"
    assert len(gateway_shm_descriptors(shm_stack)) == 1  # still open for the request in flight
    with pytest.raises(grpc.RpcError) as raised:  # a new request cannot name it
        client.ModelInfer(shm_request(shm_stack.model, hidden, "busy", "busy"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    response = in_flight.result()
    blocker.result()
    assert list(response.raw_output_contents) == [b""]
    assert torch.equal(codec.tensor_from_bytes(bytes(view), "FP32", [4, 64]), expected)
    assert gateway_shm_descriptors(shm_stack) == []


CLIENT_THAT_DIES = """
import sys, time
from multiprocessing import shared_memory
import grpc
from moe_serve_client.protos import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as rpc
region = shared_memory.SharedMemory(name=sys.argv[2], create=True, size=4096)
stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
request = pb.SystemSharedMemoryRegisterRequest(name="doomed", key="/" + sys.argv[2], byte_size=4096)
stub.SystemSharedMemoryRegister(request)
print("registered", flush=True)
time.sleep(600)
"""


def test_a_client_killed_holding_a_region(shm_stack: ProcessStack, client) -> None:
    name = f"moe_serve_test_{uuid.uuid4().hex[:12]}"
    dying = subprocess.Popen(
        [sys.executable, "-c", CLIENT_THAT_DIES, shm_stack.address, name],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )
    try:
        assert dying.stdout is not None and dying.stdout.readline().strip() == "registered"
        dying.send_signal(signal.SIGKILL)
        dying.wait(timeout=10)
        _unlink(name)  # if its resource tracker has not already: the gateway's descriptor outlives the name
        status = client.SystemSharedMemoryStatus(kserve_pb2.SystemSharedMemoryStatusRequest(name="doomed"), timeout=10)
        assert status.regions["doomed"].byte_size == 4096
        # the gateway keeps serving, through the orphaned region too (it holds the object open)
        hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
        request = shm_request(shm_stack.model, hidden, "doomed", "doomed")
        response = client.ModelInfer(request, timeout=30)
        assert list(response.outputs[0].shape) == [16, 64]
        client.ModelInfer(infer_request(shm_stack.model, hidden), timeout=30)
        client.SystemSharedMemoryUnregister(kserve_pb2.SystemSharedMemoryUnregisterRequest(name="doomed"), timeout=10)
        assert client.SystemSharedMemoryStatus(kserve_pb2.SystemSharedMemoryStatusRequest(), timeout=10).regions == {}
        assert gateway_shm_descriptors(shm_stack) == []
    finally:
        if dying.poll() is None:
            dying.kill()
        _unlink(name)


def _unlink(name: str) -> bool:
    (SHM_DIRECTORY / name).unlink(missing_ok=True)
    return True


def test_shared_memory_object_is_never_created_by_the_gateway(shm_stack: ProcessStack, client) -> None:
    """Registering a key that does not exist creates nothing (the gateway opens, never creates)."""
    key = f"/moe_serve_test_{uuid.uuid4().hex[:12]}"
    with pytest.raises(grpc.RpcError) as raised:
        register(client, "absent", key, 64)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and key in raised.value.details()
    assert not (SHM_DIRECTORY / key.lstrip("/")).exists()


def test_the_shared_memory_example_answers_as_the_message_does(shm_stack: ProcessStack) -> None:
    """examples/triton_shared_memory.py, run as a reader of the README would, against a gateway with
    --allow-client-shm."""
    example = REPOSITORY / "examples" / "triton_shared_memory.py"
    arguments = ["--url", shm_stack.address, "--model", shm_stack.model, "--hidden", "64", "--tokens", "3"]
    done = subprocess.run([sys.executable, str(example), *arguments], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "equal to the same request sent in the message: True" in done.stdout
    assert gateway_shm_descriptors(shm_stack) == []  # it unregistered its regions
