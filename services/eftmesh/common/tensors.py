"""Tensor <-> protobuf at the edge: raw little-endian bytes, one copy to encode, none to decode."""

from __future__ import annotations

import math
import sys

import torch

from eftmesh.v1 import tensor_pb2

assert sys.byteorder == "little", "eftmesh sends tensors as little-endian bytes"

_TO_TORCH = {
    tensor_pb2.DTYPE_FLOAT32: torch.float32,
    tensor_pb2.DTYPE_FLOAT16: torch.float16,
    tensor_pb2.DTYPE_BFLOAT16: torch.bfloat16,
}
_TO_PB = {v: k for k, v in _TO_TORCH.items()}


def torch_dtype(dtype: int) -> torch.dtype:
    """The torch dtype of a wire dtype; DTYPE_UNSPECIFIED means float32."""
    if dtype == tensor_pb2.DTYPE_UNSPECIFIED:
        return torch.float32
    try:
        return _TO_TORCH[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype enum value {dtype}") from None


def to_pb(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> tensor_pb2.Tensor:
    """Encode a tensor as `dtype` (float32, float16 or bfloat16) raw bytes."""
    c = t.detach().to(device="cpu", dtype=dtype).contiguous()
    # numpy has no bfloat16: move the 16-bit patterns through int16, bit for bit.
    raw = (c.view(torch.int16) if dtype == torch.bfloat16 else c).numpy().tobytes()
    return tensor_pb2.Tensor(dtype=_TO_PB[dtype], shape=list(c.shape), data=raw)


def from_pb(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """Decode a Tensor message; checks that the byte count matches the shape.

    The tensor reads the message's bytes where they lie (no copy: at a real vocabulary a
    step's rows are megabytes per role), so it is read-only: callers never write into it in
    place (torch cannot enforce that on a borrowed buffer, and says so once per process)."""
    dtype = torch_dtype(msg.dtype)
    n = math.prod(msg.shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != n * itemsize:
        raise ValueError(f"tensor of shape {list(msg.shape)} needs {n * itemsize} bytes, got {len(msg.data)}")
    if n == 0:
        return torch.empty(tuple(msg.shape), dtype=dtype)
    return torch.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape))
