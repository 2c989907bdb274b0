"""Tensor <-> protobuf at the edge: raw little-endian bytes (a batched answer's rows travel
through `common.rowswire`, copied once each way)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
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


def wire_dtype(dtype: torch.dtype) -> int:
    """The wire dtype enum of a torch dtype (float32, float16 or bfloat16)."""
    return _TO_PB[dtype]


def as_array(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a numpy array (no copy; bfloat16, which numpy lacks,
    as its int16 bits): what `rowswire.RowsReply` sends."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_pb(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """Decode a Tensor message; checks that the byte count matches the shape. Reading
    `msg.data` copies the bytes out of the message (protobuf makes a Python bytes object of
    them): a batched answer's rows come through `rowswire` and `from_buffer` instead."""
    return from_buffer(msg.data, msg.dtype, msg.shape)


def from_buffer(data: bytes | memoryview, dtype: int, shape: Sequence[int]) -> torch.Tensor:
    """A tensor over `data` (a wire dtype enum, a shape), where the bytes lie: no copy, so the
    tensor is read-only (callers never write into it in place; torch cannot enforce that on a
    borrowed buffer, and says so once per process)."""
    torch_type = torch_dtype(dtype)
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=torch_type).element_size()
    if len(data) != n * itemsize:
        raise ValueError(f"tensor of shape {list(shape)} needs {n * itemsize} bytes, got {len(data)}")
    if n == 0:
        return torch.empty(tuple(shape), dtype=torch_type)
    return torch.frombuffer(data, dtype=torch_type).reshape(tuple(shape))
