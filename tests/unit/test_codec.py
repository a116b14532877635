"""Tensor codec: exact round trips for every datatype, zero-copy decoding, clear length errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import codec
from moe_serve.runtime.errors import InvalidInput

DTYPES = list(codec.DATATYPE_TO_TORCH.values())


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4),
    seed=st.integers(0, 999),
)
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        tensor = torch.randn(shape, generator=generator).to(dtype)
    elif dtype == torch.bool:
        tensor = torch.randint(0, 2, shape, generator=generator).bool()
    else:
        tensor = torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=generator).to(dtype)
    message = codec.to_proto(tensor)
    decoded = codec.from_proto(message)
    assert decoded.dtype == dtype and list(decoded.shape) == shape
    assert torch.equal(decoded.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_raw_bytes_are_little_endian_row_major() -> None:
    tensor = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    assert codec.tensor_to_bytes(tensor) == b"\x00\x00\x80\x3f\x00\x00\x00\x40"
    assert codec.tensor_to_bytes(torch.tensor([1.0], dtype=torch.bfloat16)) == b"\x80\x3f"
    assert codec.tensor_to_bytes(tensor.t()) == codec.tensor_to_bytes(tensor.t().contiguous())


def test_decoding_does_not_copy() -> None:
    data = codec.tensor_to_bytes(torch.arange(12, dtype=torch.float32))
    decoded = codec.tensor_from_bytes(data, "FP32", [3, 4])
    again = codec.tensor_from_bytes(data, "FP32", [12])
    # both views start at the same address: the bytes' own buffer, not a copy
    assert decoded.data_ptr() == again.data_ptr()
    assert decoded[2, 3] == 11


def test_length_mismatch_names_both_sizes() -> None:
    with pytest.raises(InvalidInput, match=r"7 bytes of raw content, but shape \[2\] of FP32 needs 2 x 4 = 8 bytes"):
        codec.tensor_from_bytes(b"\0" * 7, "FP32", [2], "tensor")


def test_unknown_datatype_lists_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match=r"unsupported datatype 'FP8'.*FP32"):
        codec.torch_dtype("FP8")


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    request_id=st.text(max_size=40),
)
def test_tensor_filled_in_place_has_the_sizes_the_data_path_counts(
    dtype: torch.dtype, shape: list[int], request_id: str
) -> None:
    """The gateway checks the message-size limit and every hop counts wire bytes without
    serializing a message: the sizes it adds up must be what protobuf encodes."""
    tensor = torch.zeros(shape, dtype=dtype)
    message = moe_pb2.RouteRequest(request_id=request_id, layer=3)
    without = message.ByteSize()
    payload = codec.fill_proto(message.hidden_states, tensor)
    assert message.ByteSize() == without + codec.embedded_size(tensor)
    assert payload == codec.payload_bytes(message.hidden_states) == tensor.numel() * tensor.element_size()
    assert message.hidden_states == codec.to_proto(tensor)
