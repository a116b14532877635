"""Triton's system shared-memory extension: regions of POSIX shared-memory objects that a client on
the same host registers, then names in a tensor's parameters so the gateway reads the input from,
or writes the output into, the region instead of the message.

Regions are read and written with pread/pwrite on a descriptor, never mapped: a client that shrinks
its object (ftruncate) or dies leaves a short read or write, which fails the request, where a
mapping would bring down the gateway with SIGBUS. The gateway never creates or unlinks an object;
it only opens the ones clients name (O_NOFOLLOW, regular files only) and closes them on Unregister.

A request holds the regions it uses from parsing to its response (`RegionLease`): Unregister of a
region in use removes its name at once, as the protocol says, and closes its descriptor when the
last request using it is answered (Triton's shared_memory_manager.cc defers the unmap the same way).
Everything runs on the gateway's event loop, so no lock is needed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from moe_serve.runtime.errors import AlreadyExists, InvalidInput, Overloaded, RegionNotFound, Unimplemented, quoted
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import BYTE_SIZE_PARAMETER, OFFSET_PARAMETER, REGION_PARAMETER

# where glibc's shm_open keeps POSIX shared-memory objects
SHM_DIRECTORY = Path("/dev/shm")
# each region holds a descriptor: a bound keeps a client from exhausting the gateway's (gRPC needs them)
MAX_REGIONS = 256
DISABLED_MESSAGE = (
    "client shared memory is disabled on this gateway; start it with --allow-client-shm "
    "(MOE_SERVE_ALLOW_CLIENT_SHM=true) to enable it, or send tensors in the message"
)


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor lies: `byte_size` bytes from `offset` (bytes) into the region named `region`."""

    region: str
    offset: int
    byte_size: int


def _int_parameter(parameter: kserve_pb2.InferParameter, name: str, what: str) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter {name!r} of {what} must be an integer (int64_param), got {kind or 'nothing'}")
    value = int(getattr(parameter, kind))
    if value < 0:
        raise InvalidInput(f"parameter {name!r} of {what} is {value}; it must not be negative")
    return value


def tensor_location(parameters: dict[str, kserve_pb2.InferParameter], what: str) -> TensorLocation | None:
    """The shared-memory location a tensor's parameters name, or None when they name none.

    `shared_memory_region` (string) and `shared_memory_byte_size` go together;
    `shared_memory_offset` is optional (0), as the protocol says.
    """
    if REGION_PARAMETER not in parameters:
        for name in (OFFSET_PARAMETER, BYTE_SIZE_PARAMETER):
            if name in parameters:
                raise InvalidInput(f"{what} has parameter {name!r} without {REGION_PARAMETER!r}; give both or neither")
        return None
    region = parameters[REGION_PARAMETER]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"parameter {REGION_PARAMETER!r} of {what} must be a string (string_param)")
    if BYTE_SIZE_PARAMETER not in parameters:
        raise InvalidInput(
            f"{what} names shared-memory region {quoted(region.string_param)} without {BYTE_SIZE_PARAMETER!r}"
        )
    offset = (
        _int_parameter(parameters[OFFSET_PARAMETER], OFFSET_PARAMETER, what) if OFFSET_PARAMETER in parameters else 0
    )
    return TensorLocation(
        region.string_param, offset, _int_parameter(parameters[BYTE_SIZE_PARAMETER], BYTE_SIZE_PARAMETER, what)
    )


def _object_name(key: str) -> str:
    """The file name of shared-memory object `key` in SHM_DIRECTORY, as glibc's shm_open derives it
    (leading slashes dropped); InvalidInput for a key shm_open refuses, or one naming a directory."""
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", "..") or len(name) > 255 or "\0" in name:
        raise InvalidInput(
            f"shared-memory key {quoted(key)} is not a POSIX shared-memory object name: "
            "one name of at most 255 characters, with an optional leading '/', e.g. '/input_simple'"
        )
    return name


@dataclass(eq=False)
class SystemSharedMemoryRegion:
    """`byte_size` bytes from `offset` of the object `key`, open as `fd`; `users`: requests holding it."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    users: int = 0
    unregistered: bool = False

    def check_span(self, location: TensorLocation, what: str) -> None:
        """InvalidInput unless `location` lies within this region."""
        if location.offset >= self.byte_size or location.offset + location.byte_size > self.byte_size:
            raise InvalidInput(
                f"{what}: {location.byte_size} bytes at offset {location.offset} of shared-memory region "
                f"{quoted(self.name)} end outside it; the region has {self.byte_size} bytes"
            )

    def read(self, location: TensorLocation, what: str) -> bytes:
        self.check_span(location, what)
        self._check_object_size(location, what)
        data = os.pread(self.fd, location.byte_size, self.offset + location.offset)
        if len(data) != location.byte_size:
            raise InvalidInput(f"{what}: shared-memory object {quoted(self.key)} shrank while it was read")
        return data

    def write(self, location: TensorLocation, data: bytes, what: str) -> None:
        self.check_span(TensorLocation(location.region, location.offset, len(data)), what)
        self._check_object_size(location, what)
        view, position = memoryview(data), self.offset + location.offset
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def _check_object_size(self, location: TensorLocation, what: str) -> None:
        """The client may have shrunk its object since it registered the region: refuse to read past its
        end (a short read) or to write there (pwrite would grow the client's object)."""
        size = os.fstat(self.fd).st_size
        if self.offset + location.offset + location.byte_size > size:
            raise InvalidInput(
                f"{what}: shared-memory object {quoted(self.key)} is now {size} bytes, too small for region "
                f"{quoted(self.name)} (offset {self.offset}, {self.byte_size} bytes); register it again"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SharedMemoryRegistry:
    """Registered system shared-memory regions by name (Triton's SharedMemoryManager, system memory only).

    `enabled` False (the default, as Triton's --allow-client-shm): Register and Unregister answer
    UNIMPLEMENTED and no tensor can name a region. `max_input_bytes` (0: no bound) bounds an input
    read from a region as the public port's receive limit bounds one sent in the message.
    """

    def __init__(
        self, enabled: bool, max_input_bytes: int = 0, directory: Path = SHM_DIRECTORY, max_regions: int = MAX_REGIONS
    ) -> None:
        self.enabled, self.directory, self.max_regions = enabled, directory, max_regions
        self.max_input_bytes = max_input_bytes
        self.regions: dict[str, SystemSharedMemoryRegion] = {}
        self._unregistered_in_use: set[SystemSharedMemoryRegion] = set()

    @property
    def open_descriptors(self) -> int:
        """Descriptors this registry holds: registered regions and unregistered ones still in use."""
        return len(self.regions) + len(self._unregistered_in_use)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not self.enabled:
            raise Unimplemented(DISABLED_MESSAGE)
        if not name:
            raise InvalidInput("a shared-memory region needs a name")
        if name in self.regions:
            raise AlreadyExists(
                f"shared memory region {quoted(name)} already in manager; unregister it first or choose another name"
            )
        if len(self.regions) >= self.max_regions:
            raise Overloaded(
                f"{self.max_regions} shared-memory regions are registered, the most this gateway holds; "
                "unregister some first"
            )
        if byte_size == 0:
            raise InvalidInput(f"failed to register shared memory region {quoted(name)}: byte_size must be positive")
        fd = self._open(name, key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidInput(
                    f"failed to register shared memory region {quoted(name)}: offset {offset} + byte_size "
                    f"{byte_size} = {offset + byte_size} bytes, but shared-memory object {quoted(key)} has {size}"
                )
        except BaseException:
            os.close(fd)
            raise
        self.regions[name] = SystemSharedMemoryRegion(name, key, offset, byte_size, fd)

    def _open(self, name: str, key: str) -> int:
        path = self.directory / _object_name(key)
        try:
            # O_NOFOLLOW: a symbolic link in /dev/shm must not let a client aim the gateway's writes elsewhere
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise RegionNotFound(
                f"Unable to open shared memory region {quoted(key)} for region {quoted(name)}: no such "
                "shared-memory object (create it with shm_open, e.g. tritonclient's create_shared_memory_region)"
            ) from None
        except OSError as error:
            raise InvalidInput(
                f"Unable to open shared memory region {quoted(key)} for region {quoted(name)}: {error.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidInput(f"shared-memory key {quoted(key)} is not a shared-memory object (not a regular file)")
        return fd

    def status(self, name: str = "") -> list[SystemSharedMemoryRegion]:
        """Every region, or the one named (RegionNotFound when it is not registered)."""
        if not name:
            return list(self.regions.values())
        if name not in self.regions:
            raise RegionNotFound(f"Unable to find system shared memory region: {quoted(name)}")
        return [self.regions[name]]

    def unregister(self, name: str = "") -> None:
        """Forget one region (every region when `name` is empty); an unknown name is no error (Triton).
        A region in use is closed when its last request is answered."""
        if not self.enabled:
            raise Unimplemented(DISABLED_MESSAGE)
        for region_name in [name] if name else list(self.regions):
            region = self.regions.pop(region_name, None)
            if region is None:
                continue
            region.unregistered = True
            if region.users:
                self._unregistered_in_use.add(region)
            else:
                region.close()

    def lease(self) -> RegionLease:
        return RegionLease(self)

    def acquire(self, location: TensorLocation, what: str) -> SystemSharedMemoryRegion:
        """The region `location` names, checked to hold it, with one more user."""
        region = self.regions.get(location.region)
        if region is None:
            if not self.enabled:
                raise InvalidInput(f"{what} names shared-memory region {quoted(location.region)}: {DISABLED_MESSAGE}")
            raise RegionNotFound(
                f"Unable to find shared memory region: {quoted(location.region)} (named by {what}); "
                "register it with SystemSharedMemoryRegister first"
            )
        region.check_span(location, what)
        region.users += 1
        return region

    def release(self, region: SystemSharedMemoryRegion) -> None:
        region.users -= 1
        if region.users == 0 and region.unregistered:
            self._unregistered_in_use.discard(region)
            region.close()

    def close(self) -> None:
        """Close every descriptor (gateway shutdown, after in-flight requests finished)."""
        for region in [*self.regions.values(), *self._unregistered_in_use]:
            region.close()
        self.regions.clear()
        self._unregistered_in_use.clear()


@dataclass
class RegionLease:
    """The regions one request uses, held from parsing until its response is built.

    inputs are read at once (`read_input`); outputs are bound while parsing (`bind_output`, which checks
    that the region is large enough before any compute) and written when the response is built.
    `bytes_read` / `bytes_written`: tensor bytes that went through shared memory, not the message.
    """

    registry: SharedMemoryRegistry
    outputs: dict[str, tuple[SystemSharedMemoryRegion, TensorLocation]] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    _held: list[SystemSharedMemoryRegion] = field(default_factory=list)

    def read_input(self, location: TensorLocation, expected_bytes: int, what: str) -> bytes:
        """The bytes of an input of `expected_bytes` bytes (its shape x datatype) from its location."""
        region = self._acquire(location, what)
        limit = self.registry.max_input_bytes
        if limit and expected_bytes > limit:
            raise Overloaded(
                f"{what} has {expected_bytes} bytes, more than the {limit} this gateway takes in one request; "
                "send fewer tokens per request",
                reason="message_size",
            )
        if location.byte_size != expected_bytes:
            raise InvalidInput(
                f"{what}: {BYTE_SIZE_PARAMETER!r} is {location.byte_size}, but its shape and datatype need "
                f"{expected_bytes} bytes"
            )
        data = region.read(location, what)
        self.bytes_read += len(data)
        return data

    def bind_output(self, name: str, location: TensorLocation, needed_bytes: int, what: str) -> None:
        """Reserve `location` for output `name`, which will need `needed_bytes` bytes."""
        region = self._acquire(location, what)
        if needed_bytes > location.byte_size:
            raise InvalidInput(
                f"shared memory size specified with the request for output {quoted(name)} ({location.byte_size} "
                f"bytes) should be at least {needed_bytes} bytes to hold the results"
            )
        self.outputs[name] = (region, location)

    def write_output(self, name: str, data: bytes) -> TensorLocation:
        """Write output `name` into its bound location; return where it lies (its actual byte size)."""
        region, location = self.outputs[name]
        region.write(location, data, f"output {quoted(name)}")
        self.bytes_written += len(data)
        return TensorLocation(location.region, location.offset, len(data))

    def _acquire(self, location: TensorLocation, what: str) -> SystemSharedMemoryRegion:
        region = self.registry.acquire(location, what)
        self._held.append(region)
        return region

    def release(self) -> None:
        for region in self._held:
            self.registry.release(region)
        self._held.clear()

    def __enter__(self) -> RegionLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
