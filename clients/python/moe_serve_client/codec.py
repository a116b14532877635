"""Tensors <-> the raw little-endian bytes of KServe v2's `raw_input_contents` / `raw_output_contents`.

The client's own codec, so that it needs numpy only: torch tensors are accepted and returned when
torch is installed (the caller passed one, so it is imported already), numpy arrays otherwise.
Decoding is zero-copy: results view the response bytes, which are immutable, so they are read-only.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # the wire format is little-endian raw memory
    raise ImportError("moe-serve-client needs a little-endian host")

# torch warns once per call site that the bytes object is read-only; decoded tensors are never written
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# KServe datatype -> element type, named as numpy and torch both name it: the one datatype table of
# client and server (moe_serve.runtime.codec builds its torch table from it). BF16 has no numpy dtype; only
# torch decodes it.
DATATYPE_ELEMENT_TYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    name: np.dtype(element) for name, element in DATATYPE_ELEMENT_TYPES.items() if name != "BF16"
}
NUMPY_TO_DATATYPE = {dtype: name for name, dtype in DATATYPE_TO_NUMPY.items()}
ITEMSIZE = {**{name: dtype.itemsize for name, dtype in DATATYPE_TO_NUMPY.items()}, "BF16": 2}
INPUT_DATATYPES = ("FP32", "FP16", "BF16")

Array = Any  # a torch.Tensor or a numpy.ndarray; torch stays optional, so no import for the annotation


class MalformedTensor(ValueError):
    """Raw bytes that do not match their declared datatype and shape."""


def is_torch_tensor(value: object) -> bool:
    """Whether `value` is a torch.Tensor, without importing torch (it is imported if a tensor exists)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def datatype_name(array: Array) -> str:
    """The KServe datatype of a tensor or array (`FP32`, `BF16`, ...)."""
    if is_torch_tensor(array):
        import torch

        names = {getattr(torch, element): name for name, element in DATATYPE_ELEMENT_TYPES.items()}
        return names[array.dtype]
    return NUMPY_TO_DATATYPE[np.dtype(array.dtype)]


def to_bytes(array: Array) -> bytes:
    """Row-major little-endian bytes of a tensor (any device) or array (one copy)."""
    if is_torch_tensor(array):
        import torch

        flat = array.detach().contiguous().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        return flat.view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(array).tobytes()


def from_bytes(data: bytes, datatype: str, shape: Sequence[int], as_torch: bool, what: str = "tensor") -> Array:
    """A read-only torch tensor (as_torch) or numpy array viewing `data`.

    Raises MalformedTensor when the datatype is unknown or the length does not match the shape.
    """
    if datatype not in ITEMSIZE:
        raise MalformedTensor(f"{what}: unsupported datatype {datatype!r}")
    if any(dim < 0 for dim in shape):
        raise MalformedTensor(f"{what}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    expected = count * ITEMSIZE[datatype]
    if len(data) != expected:
        raise MalformedTensor(
            f"{what}: {len(data)} bytes of raw content, but shape {list(shape)} of {datatype} "
            f"needs {count} x {ITEMSIZE[datatype]} = {expected} bytes"
        )
    if as_torch:
        return _torch_from_bytes(data, datatype, tuple(shape), count)
    if datatype == "BF16":
        raise MalformedTensor(f"{what}: BF16 needs torch to decode (numpy has no bfloat16); pass torch tensors")
    return np.frombuffer(data, dtype=DATATYPE_TO_NUMPY[datatype], count=count).reshape(tuple(shape))


def _torch_from_bytes(data: bytes, datatype: str, shape: tuple[int, ...], count: int) -> torch.Tensor:
    import torch

    dtype = getattr(torch, DATATYPE_ELEMENT_TYPES[datatype])
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)
