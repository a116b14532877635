"""Tensor codec: torch tensors <-> raw little-endian bytes with a KServe datatype and shape.

Used by every hop. Decoding is zero-copy (`torch.frombuffer` over the received bytes); encoding
makes the one copy protobuf needs. Decoded tensors share memory with the message bytes, which
are immutable, so they must be treated as read-only.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence

import torch

from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime.errors import InvalidInput
from moe_serve_client.codec import DATATYPE_ELEMENT_TYPES, INPUT_DATATYPES

if sys.byteorder != "little":  # the wire format is little-endian raw memory
    raise ImportError("moe-serve needs a little-endian host")

# torch warns once per call site that the bytes object is read-only; we never write to it.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# the client's datatype table (one for both), as torch dtypes
DATATYPE_TO_TORCH: dict[str, torch.dtype] = {
    name: getattr(torch, element) for name, element in DATATYPE_ELEMENT_TYPES.items()
}
TORCH_TO_DATATYPE: dict[torch.dtype, str] = {v: k for k, v in DATATYPE_TO_TORCH.items()}
FLOAT_DATATYPES = INPUT_DATATYPES  # FP32, FP16, BF16: what hidden states may be


def torch_dtype(datatype: str) -> torch.dtype:
    """The torch dtype of a KServe datatype name (`FP32`, `BF16`, ...)."""
    try:
        return DATATYPE_TO_TORCH[datatype]
    except KeyError:
        known = ", ".join(DATATYPE_TO_TORCH)
        raise InvalidInput(f"unsupported datatype {datatype!r}; known datatypes: {known}") from None


def datatype_name(dtype: torch.dtype) -> str:
    """The KServe datatype name of a torch dtype."""
    return TORCH_TO_DATATYPE[dtype]


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of `tensor` (one copy)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, datatype: str, shape: Sequence[int], what: str = "tensor") -> torch.Tensor:
    """A read-only tensor viewing `data`; raises InvalidInput when the length does not match."""
    dtype = torch_dtype(datatype)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"{what}: shape {list(shape)} has a negative dimension")
    count = element_count(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{what}: {len(data)} bytes of raw content, but shape {list(shape)} of {datatype} "
            f"needs {count} x {dtype.itemsize} = {expected} bytes"
        )
    if count == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(tuple(shape))


def to_proto(tensor: torch.Tensor) -> moe_pb2.Tensor:
    """Internal wire form of a tensor."""
    message = moe_pb2.Tensor()
    fill_proto(message, tensor)
    return message


def fill_proto(field: moe_pb2.Tensor, tensor: torch.Tensor) -> int:
    """Write `tensor` into a message's Tensor field in place; returns its payload bytes.

    For the large tensors of the data path: passing a built Tensor to a message's constructor
    copies its bytes twice more (3.2 against 1.2 ms for 8 MiB, measured).
    """
    field.datatype = datatype_name(tensor.dtype)
    field.shape.extend(tensor.shape)
    field.data = tensor_to_bytes(tensor)
    return tensor.nbytes


def embedded_size(tensor: torch.Tensor) -> int:
    """Bytes `tensor` adds to a message as a Tensor field numbered below 16, as protobuf encodes it."""
    body = moe_pb2.Tensor(datatype=datatype_name(tensor.dtype), shape=list(tensor.shape)).ByteSize()
    data = tensor.nbytes
    if data:  # proto3 leaves an empty bytes field out
        body += 1 + _varint_size(data) + data
    return 1 + _varint_size(body) + body


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def payload_bytes(*tensors: moe_pb2.Tensor) -> int:
    """Data bytes the wire tensors carry, from their shapes (reading `data` would copy it)."""
    return sum(element_count(t.shape) * torch_dtype(t.datatype).itemsize for t in tensors)


def from_proto(message: moe_pb2.Tensor, what: str = "tensor") -> torch.Tensor:
    """Tensor view of an internal wire tensor (read-only)."""
    return tensor_from_bytes(message.data, message.datatype, list(message.shape), what)
