"""The system shared-memory region manager in one process (no server): registration, validation,
reads and writes, regions unregistered while a request holds them, and the converters' use of them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from gateway.converters import InferenceResult, build_infer_response, parse_infer_request
from gateway.model import ServedModel
from gateway.shared_memory import (
    BYTE_SIZE_PARAMETER,
    OFFSET_PARAMETER,
    REGION_PARAMETER,
    SharedMemoryRegistry,
    TensorLocation,
    tensor_location,
)
from moe_serve.runtime.errors import AlreadyExists, InvalidInput, Overloaded, RegionNotFound, Unimplemented
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import RequestedOutput, SharedMemory, infer_request

SIZE = 4096


@pytest.fixture
def make_object(tmp_path: Path) -> Callable[..., str]:
    """Create a shared-memory object stand-in of `size` bytes (a file in tmp_path); returns its key."""

    def make(name: str = "segment", size: int = SIZE) -> str:
        path = tmp_path / name
        path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
        return f"/{name}"

    return make


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SharedMemoryRegistry]:
    registry = SharedMemoryRegistry(True, max_input_bytes=SIZE, directory=tmp_path)
    yield registry
    registry.close()


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_register_status_unregister(registry: SharedMemoryRegistry, make_object: Callable[..., str]) -> None:
    key = make_object()
    registry.register("in", key, 256, 1024)
    registry.register("out", key, 0, SIZE)
    assert [(r.name, r.key, r.offset, r.byte_size) for r in registry.status()] == [
        ("in", key, 256, 1024),
        ("out", key, 0, SIZE),
    ]
    assert [r.name for r in registry.status("out")] == ["out"]
    fd = registry.regions["in"].fd
    registry.unregister("in")
    assert not _open(fd) and [r.name for r in registry.status()] == ["out"]
    registry.unregister("never-registered")  # as Triton: not an error
    registry.unregister()
    assert registry.status() == [] and registry.open_descriptors == 0


def test_registration_is_validated(
    registry: SharedMemoryRegistry, make_object: Callable[..., str], tmp_path: Path
) -> None:
    key = make_object()
    registry.register("region", key, 0, 64)
    with pytest.raises(AlreadyExists, match="'region' already in manager"):
        registry.register("region", key, 0, 64)
    with pytest.raises(RegionNotFound, match=r"'/absent'.*no such shared-memory object"):
        registry.register("other", "/absent", 0, 64)
    with pytest.raises(InvalidInput, match=f"offset 4000 \\+ byte_size 200 = 4200 bytes, but .* has {SIZE}"):
        registry.register("other", key, 4000, 200)
    with pytest.raises(InvalidInput, match="byte_size must be positive"):
        registry.register("other", key, 0, 0)
    for bad_key in ("", "/", "a/b", "/..", "x" * 300):
        with pytest.raises(InvalidInput, match="not a POSIX shared-memory object name"):
            registry.register("other", bad_key, 0, 64)
    with pytest.raises(InvalidInput, match="needs a name"):
        registry.register("", key, 0, 64)
    # a link in the shared-memory directory must not aim the gateway's writes at another file
    (tmp_path / "link").symlink_to(tmp_path / "segment")
    with pytest.raises(InvalidInput, match="'/link'"):
        registry.register("other", "/link", 0, 64)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidInput, match="not a regular file"):
        registry.register("other", "/fifo", 0, 64)
    assert [r.name for r in registry.status()] == ["region"] and registry.open_descriptors == 1
    with pytest.raises(RegionNotFound, match="'other'"):
        registry.status("other")


def test_registered_regions_are_bounded(tmp_path: Path, make_object: Callable[..., str]) -> None:
    registry = SharedMemoryRegistry(True, directory=tmp_path, max_regions=2)
    key = make_object()
    registry.register("a", key, 0, 64)
    registry.register("b", key, 0, 64)
    with pytest.raises(Overloaded, match="2 shared-memory regions"):
        registry.register("c", key, 0, 64)
    registry.close()


def test_disabled_registry_refuses_with_the_flag_to_set(tmp_path: Path, make_object: Callable[..., str]) -> None:
    registry = SharedMemoryRegistry(False, directory=tmp_path)
    with pytest.raises(Unimplemented, match="--allow-client-shm"):
        registry.register("region", make_object(), 0, 64)
    with pytest.raises(Unimplemented, match="--allow-client-shm"):
        registry.unregister()
    assert registry.status() == []
    with registry.lease() as lease, pytest.raises(InvalidInput, match="--allow-client-shm"):
        lease.read_input(TensorLocation("region", 0, 64), 64, "input 'x'")


def _parameters(**values: object) -> dict[str, kserve_pb2.InferParameter]:
    parameters: dict[str, kserve_pb2.InferParameter] = {}
    for name, value in values.items():
        parameter = kserve_pb2.InferParameter()
        if isinstance(value, str):
            parameter.string_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.int64_param = int(value)
        parameters[name] = parameter
    return parameters


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({BYTE_SIZE_PARAMETER: 8}, f"'{BYTE_SIZE_PARAMETER}' without '{REGION_PARAMETER}'"),
        ({OFFSET_PARAMETER: 8}, f"'{OFFSET_PARAMETER}' without '{REGION_PARAMETER}'"),
        ({REGION_PARAMETER: "r"}, f"without '{BYTE_SIZE_PARAMETER}'"),
        ({REGION_PARAMETER: 3, BYTE_SIZE_PARAMETER: 8}, "must be a string"),
        ({REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8.0}, "must be an integer"),
        ({REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8, OFFSET_PARAMETER: -1}, "must not be negative"),
    ],
)
def test_tensor_parameters_are_validated(values: dict[str, object], phrase: str) -> None:
    with pytest.raises(InvalidInput, match=phrase):
        tensor_location(_parameters(**values), "input 'x'")


def test_tensor_parameters() -> None:
    assert tensor_location({}, "input 'x'") is None
    assert tensor_location(_parameters(**{REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8}), "x") == TensorLocation(
        "r", 0, 8
    )
    parameters = _parameters(**{REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8, OFFSET_PARAMETER: 16})
    assert tensor_location(parameters, "x") == TensorLocation("r", 16, 8)


def test_reads_and_writes_stay_inside_the_region(
    registry: SharedMemoryRegistry, make_object: Callable[..., str], tmp_path: Path
) -> None:
    key = make_object()
    registry.register("region", key, 1024, 512)
    with registry.lease() as lease:
        assert lease.read_input(TensorLocation("region", 16, 8), 8, "input 'x'") == bytes(range(16, 24))
        with pytest.raises(InvalidInput, match=r"'shared_memory_byte_size' is 8, but .* need 12 bytes"):
            lease.read_input(TensorLocation("region", 0, 8), 12, "input 'x'")
        with pytest.raises(InvalidInput, match=r"8 bytes at offset 508 .* region has 512 bytes"):
            lease.read_input(TensorLocation("region", 508, 8), 8, "input 'x'")
        with pytest.raises(InvalidInput, match="offset 512"):
            lease.read_input(TensorLocation("region", 512, 0), 0, "input 'x'")
        with pytest.raises(Overloaded, match=f"has {SIZE + 4} bytes, more than the {SIZE}"):
            lease.read_input(TensorLocation("region", 0, 8), SIZE + 4, "input 'x'")
        with pytest.raises(RegionNotFound, match="'nowhere'"):
            lease.read_input(TensorLocation("nowhere", 0, 8), 8, "input 'x'")
        with pytest.raises(InvalidInput, match=r"output 'out' \(16 bytes\) should be at least 32 bytes"):
            lease.bind_output("out", TensorLocation("region", 0, 16), 32, "output 'out'")
        lease.bind_output("out", TensorLocation("region", 100, 32), 4, "output 'out'")
        assert lease.write_output("out", b"\xff" * 4) == TensorLocation("region", 100, 4)
        assert (lease.bytes_read, lease.bytes_written) == (8, 4)
    data = (tmp_path / "segment").read_bytes()
    assert data[1124:1128] == b"\xff" * 4 and data[1128] == 1128 % 256 and data[1123] == 1123 % 256
    assert registry.regions["region"].users == 0


def test_a_shrunk_object_fails_the_request_without_growing_it(
    registry: SharedMemoryRegistry, make_object: Callable[..., str], tmp_path: Path
) -> None:
    key = make_object()
    registry.register("region", key, 0, SIZE)
    os.truncate(tmp_path / "segment", 100)
    with registry.lease() as lease:
        with pytest.raises(InvalidInput, match="is now 100 bytes"):
            lease.read_input(TensorLocation("region", 0, 200), 200, "input 'x'")
        lease.bind_output("out", TensorLocation("region", 0, 200), 200, "output 'out'")
        with pytest.raises(InvalidInput, match="is now 100 bytes"):
            lease.write_output("out", bytes(200))
    assert (tmp_path / "segment").stat().st_size == 100


def test_unregistered_in_use_closes_when_the_last_request_is_done(
    registry: SharedMemoryRegistry, make_object: Callable[..., str]
) -> None:
    key = make_object()
    registry.register("region", key, 0, SIZE)
    fd = registry.regions["region"].fd
    first, second = registry.lease(), registry.lease()
    first.bind_output("out", TensorLocation("region", 0, 8), 8, "output 'out'")
    second.read_input(TensorLocation("region", 0, 8), 8, "input 'x'")
    registry.unregister("region")
    # the name is gone at once (a new request cannot use it, the name can be registered again) ...
    assert registry.status() == [] and registry.open_descriptors == 1
    with pytest.raises(RegionNotFound):
        registry.lease().read_input(TensorLocation("region", 0, 8), 8, "input 'x'")
    registry.register("region", key, 0, 64)
    # ... while requests holding it still read and write it
    first.write_output("out", b"12345678")
    second.release()
    assert _open(fd) and registry.open_descriptors == 2
    first.release()
    assert not _open(fd) and registry.open_descriptors == 1


def test_close_closes_every_descriptor(registry: SharedMemoryRegistry, make_object: Callable[..., str]) -> None:
    key = make_object()
    registry.register("a", key, 0, 64)
    registry.register("b", key, 0, 64)
    held = registry.lease()
    held.read_input(TensorLocation("b", 0, 8), 8, "input 'x'")
    registry.unregister("b")
    fds = [registry.regions["a"].fd, held._held[0].fd]
    registry.close()
    assert registry.open_descriptors == 0 and not any(_open(fd) for fd in fds)
    held.release()  # a request answered after shutdown closes nothing twice


MODEL = ServedModel(
    name="m",
    family="mixtral",
    hidden_size=4,
    num_experts=8,
    top_k=2,
    moe_layers=(0,),
    num_layers=1,
    compute_dtype=torch.float32,
)


def _shm_request(hidden: torch.Tensor, region: str, outputs: dict[str, tuple[str, int, int]]):
    """A ModelInferRequest whose input lies at the start of `region` and whose outputs are
    {name: (region, offset, byte_size)} (region "": in the message)."""
    return infer_request(
        "m",
        hidden,
        outputs=[
            RequestedOutput(name, SharedMemory(out_region, size, offset) if out_region else None)
            for name, (out_region, offset, size) in outputs.items()
        ],
        input_shared_memory=SharedMemory(region, hidden.numel() * 4),
    )


def test_converters_read_inputs_from_and_write_outputs_to_regions(
    registry: SharedMemoryRegistry, make_object: Callable[..., str], tmp_path: Path
) -> None:
    hidden = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    (tmp_path / "segment").write_bytes(hidden.numpy().tobytes() + bytes(SIZE - 48))
    registry.register("region", "/segment", 0, SIZE)
    outputs = {"output": ("region", 1024, 48), "router_logits": ("", 0, 0), "expert_ids": ("region", 2048, 24)}
    request = _shm_request(hidden, "region", outputs)
    with registry.lease() as lease:
        inference = parse_infer_request(request, MODEL, "id", lease)
        assert torch.equal(inference.hidden_states, hidden) and set(lease.outputs) == {"output", "expert_ids"}
        result = InferenceResult(
            tensors={
                "output": hidden * 2,
                "router_logits": torch.ones(3, 8),
                "expert_ids": torch.ones(3, 2, dtype=torch.int32),
            }
        )
        response = build_infer_response(request, inference, result, MODEL, lease)
    # as Triton: one raw_output_contents entry per output, empty for those in shared memory
    assert [len(raw) for raw in response.raw_output_contents] == [0, 3 * 8 * 4, 0]
    assert response.outputs[0].parameters[BYTE_SIZE_PARAMETER].int64_param == 48
    assert response.outputs[2].parameters[OFFSET_PARAMETER].int64_param == 2048
    data = (tmp_path / "segment").read_bytes()
    assert data[1024:1072] == (hidden * 2).numpy().tobytes() and data[2048:2072] == bytes([1, 0, 0, 0]) * 6
    assert registry.regions["region"].users == 0

    both = _shm_request(hidden, "region", {})
    both.raw_input_contents.append(hidden.numpy().tobytes())
    with registry.lease() as lease, pytest.raises(InvalidInput, match="and also sends contents"):
        parse_infer_request(both, MODEL, "id", lease)
    small = _shm_request(hidden, "region", {"expert_ids": ("region", 0, 20)})
    with (
        registry.lease() as lease,
        pytest.raises(InvalidInput, match="'expert_ids' \\(20 bytes\\) should be at least 24"),
    ):
        parse_infer_request(small, MODEL, "id", lease)
