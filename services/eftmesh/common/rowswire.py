"""A batched call's rows on the wire with one copy each way.

A ScoreBatch or DraftBatch answer is mostly its rows: 16 rows of 128,256 float32 entries are
8 MiB per role per step. Built as a protobuf message, those bytes were copied five times on the
way out (the rows joined into one tensor, that tensor's bytes, the message's own copy of them,
its serialisation, gRPC's) and three times on the way in (gRPC's, the parse, the bytes field
read back as a Python object): at 32 rows of 128k, ~17 ms of a logit service's step and ~3 ms
per role of the combiner's on this project's CPU, much of it page faults on fresh buffers.

The bytes stay standard protobuf (any client, grpcurl or another language's, parses them as
the message), laid out so that each side copies the rows once, as gRPC hands them over:

- out (`serialize` of a `RowsReply`): a `logits` field holding only `data`, whose bytes are
  copied straight from the rows' memory into the one bytes object gRPC sends; then the rest of
  the message, whose `logits` holds the dtype and shape. A parser merges the two `logits`
  occurrences (protobuf's rule for a singular message field seen twice), so the message read is
  the one the servicer would have built whole.
- in (`deserializer`): the leading `logits` occurrences are read here and their `data` kept as a
  view of the received bytes (torch then reads the rows there: `tensors.from_buffer`); the rest
  is parsed by protobuf. A `logits` field after other fields (a layout neither this nor
  protobuf's own serialisation writes: protobuf writes fields in number order, so `logits`,
  field 1, comes first) is read by protobuf whole, with its copies, as before.

Pure bytes code: no gRPC, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eftmesh.v1 import logit_pb2, tensor_pb2

# `logits` is field 1 of both batched answers, `data` field 3 of Tensor (checked at import)
_LOGITS = 1
_DATA = 3
assert all(m.DESCRIPTOR.fields_by_name["logits"].number == _LOGITS
           for m in (logit_pb2.ScoreBatchResponse, logit_pb2.DraftBatchResponse))
assert tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number == _DATA

# The service whose two batched calls these are (the logit service registers their serializer,
# the combiner's stubs their deserializer)
LOGIT_SERVICE = logit_pb2.DESCRIPTOR.services_by_name["LogitService"].full_name

_LEN = 2  # the wire type of length-delimited fields (messages, bytes, packed repeated)
_LOGITS_KEY = (_LOGITS << 3) | _LEN  # one byte: 0x0a
_DATA_KEY = bytes([(_DATA << 3) | _LEN])


def varint(n: int) -> bytes:
    """n >= 0 as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at buf[pos:] and the position after it."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _field_end(buf: memoryview, pos: int, wire_type: int, limit: int) -> int:
    """The end of a field's value that starts at pos (after its key)."""
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 1:
        end = pos + 8
    elif wire_type == _LEN:
        n, pos = _read_varint(buf, pos)
        end = pos + n
    elif wire_type == 5:
        end = pos + 4
    else:  # groups (3, 4) are not proto3; 6 and 7 are not wire types
        raise ValueError(f"wire type {wire_type} in a batched answer")
    if end > limit:
        raise ValueError("a field runs past the end of its message")
    return end


@dataclass
class RowsReply:
    """A batched answer as its servicer returns it, before `serialize`: the message, whose
    logits hold the dtype and shape but no data, and the arrays whose bytes, in order, are
    logits.data (C-contiguous; bfloat16 rows as their int16 bits)."""

    message: Any
    parts: Sequence[np.ndarray]


def serialize(reply: Any) -> bytes:
    """A batched answer's bytes: a `RowsReply`'s rows copied once, into the bytes gRPC sends;
    any other message as protobuf serialises it."""
    if not isinstance(reply, RowsReply):
        return reply.SerializeToString()
    views = [memoryview(p).cast("B") for p in reply.parts if p.nbytes]
    n = sum(len(v) for v in views)
    inner = _DATA_KEY + varint(n)
    return b"".join([bytes([_LOGITS_KEY]), varint(len(inner) + n), inner, *views, reply.message.SerializeToString()])


@dataclass
class RowsAnswer:
    """A batched answer as the combiner reads it: the message (its logits' dtype and shape;
    data left empty) and logits.data, a view of the received bytes where they lie."""

    message: Any
    data: memoryview | bytes


def deserializer(cls: Any) -> Callable[[bytes], RowsAnswer]:
    """The response deserializer of a batched call whose answer is a `cls` (ScoreBatchResponse
    or DraftBatchResponse): its rows' bytes not copied (module docstring)."""

    def parse(wire: bytes) -> RowsAnswer:
        buf = memoryview(wire)
        pos, end = 0, len(buf)
        heads: list[memoryview] = []  # the leading logits' fields other than data
        data: memoryview | None = None
        while pos < end and buf[pos] == _LOGITS_KEY:
            n, at = _read_varint(buf, pos + 1)
            stop = at + n
            if stop > end:
                raise ValueError("the logits field runs past the end of the answer")
            while at < stop:
                key, value = _read_varint(buf, at)
                field_end = _field_end(buf, value, key & 7, stop)
                if key == _DATA_KEY[0]:  # (a later data field replaces an earlier one, as protobuf reads it)
                    _size, start = _read_varint(buf, value)
                    data = buf[start:field_end]
                else:
                    heads.append(buf[at:field_end])
                at = field_end
            pos = stop
        message = cls.FromString(buf[pos:])
        if message.HasField("logits"):  # another logits field further on: protobuf reads it all
            whole = cls.FromString(wire)
            return RowsAnswer(whole, whole.logits.data)
        if pos:
            message.logits.MergeFromString(b"".join(heads))  # (an empty merge still marks logits set)
        return RowsAnswer(message, b"" if data is None else data)

    return parse


def as_answer(response: Any) -> RowsAnswer:
    """A batched call's answer as a `RowsAnswer`: what `deserializer` made, or a message whole
    (a stub with protobuf's own deserializer: its rows copied out of it)."""
    return response if isinstance(response, RowsAnswer) else RowsAnswer(response, response.logits.data)
