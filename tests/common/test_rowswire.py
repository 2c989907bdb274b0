"""A batched answer's rows on the wire (common/rowswire.py): the bytes are the standard protobuf
message, written with one copy of the rows and read with none."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from eftmesh.common import rowswire, tensors
from eftmesh.v1 import logit_pb2

ANSWERS = (logit_pb2.ScoreBatchResponse, logit_pb2.DraftBatchResponse)


def whole(cls, rows: torch.Tensor, results: list[logit_pb2.ItemResult]):
    """The message as protobuf would build it whole (what the servicer used to return)."""
    return cls(logits=tensors.to_pb(rows, rows.dtype), results=results, floored=True)


def reply(cls, parts: list[torch.Tensor], vocab: int, dtype: torch.dtype, results) -> rowswire.RowsReply:
    """What a servicer returns now (logit.convert.results_to_reply's shape)."""
    msg = cls(results=results, floored=True)
    msg.logits.dtype = tensors.wire_dtype(dtype)
    msg.logits.shape[:] = [sum(p.shape[0] for p in parts), vocab]
    return rowswire.RowsReply(msg, [tensors.as_array(p) for p in parts])


def items(counts: list[int]) -> list[logit_pb2.ItemResult]:
    """OK items of these row counts, with an item error after the first."""
    out = [logit_pb2.ItemResult(rows=n, cache_length=7 + n, drafts=[n, n + 1] if n > 1 else [],
                                draft_probs=[0.5, 0.25] if n > 1 else []) for n in counts]
    return out[:1] + [logit_pb2.ItemResult(code=5, message="no session s")] + out[1:]


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 3), max_size=6), vocab=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), cls=st.sampled_from(ANSWERS))
def test_a_reply_reads_as_the_whole_message_and_back_with_its_rows_in_place(counts, vocab, dtype, cls) -> None:
    rows = torch.randn(sum(counts), vocab).to(dtype)
    parts = list(rows.split(counts)) if counts else []
    results = items(counts)
    want = whole(cls, rows, results)
    wire = rowswire.serialize(reply(cls, parts, vocab, dtype, results))
    # any protobuf reader (protobuf's own here) merges the two logits fields into the message
    assert cls.FromString(wire) == want
    # the combiner's reader: the same message, the rows a view of the received bytes
    got = rowswire.deserializer(cls)(wire)
    assert got.message.results == want.results and got.message.floored
    assert got.message.logits.dtype == want.logits.dtype and list(got.message.logits.shape) == [len(rows), vocab]
    assert bytes(got.data) == want.logits.data
    if rows.numel():
        assert isinstance(got.data, memoryview) and got.data.obj is wire  # not copied
        assert torch.equal(tensors.from_buffer(got.data, got.message.logits.dtype, got.message.logits.shape), rows)


@pytest.mark.parametrize("cls", ANSWERS)
def test_protobufs_own_bytes_and_other_layouts_read_the_same(cls) -> None:
    """A sender that serialised the whole message (protobuf's layout: logits first, data
    inside it), one whose logits comes after its results, and one with two data fields (the
    later one counts, as protobuf reads it) all read as protobuf reads them."""
    rows = torch.randn(3, 5)
    want = whole(cls, rows, items([1, 2]))
    standard = want.SerializeToString()
    got = rowswire.deserializer(cls)(standard)
    assert got.message.results == want.results and bytes(got.data) == want.logits.data
    assert isinstance(got.data, memoryview)  # read in place here too
    head = cls(results=want.results, floored=True).SerializeToString()
    late = head + cls(logits=want.logits).SerializeToString()  # logits after the results
    got = rowswire.deserializer(cls)(late)
    assert got.message == cls.FromString(late) and bytes(got.data) == want.logits.data
    other = torch.randn(3, 5)
    twice = cls(logits=tensors.to_pb(other)).SerializeToString() + standard  # two logits fields, each with data
    got = rowswire.deserializer(cls)(twice)
    assert bytes(got.data) == cls.FromString(twice).logits.data == want.logits.data


def test_an_answer_with_no_rows_and_a_stubs_message_read_as_answers() -> None:
    """All items failed (0 rows): logits [0, vocab], no bytes; a plain message (a stub with
    protobuf's deserializer) becomes an answer with its rows copied out."""
    cls = logit_pb2.ScoreBatchResponse
    got = rowswire.deserializer(cls)(rowswire.serialize(reply(cls, [], 11, torch.float32, items([]))))
    assert list(got.message.logits.shape) == [0, 11] and len(got.data) == 0
    assert got.message.results[0].code == 5
    msg = whole(cls, torch.ones(1, 2), items([1]))
    assert bytes(rowswire.as_answer(msg).data) == msg.logits.data
    assert rowswire.as_answer(got) is got


def test_bytes_that_end_inside_a_field_are_refused() -> None:
    cls = logit_pb2.ScoreBatchResponse
    wire = rowswire.serialize(reply(cls, [torch.randn(2, 8)], 8, torch.float32, items([2])))
    for cut in (1, 2, 4, 20, len(wire) // 2):
        with pytest.raises((ValueError, DecodeError)):
            rowswire.deserializer(cls)(wire[:cut])


def test_varints_round_trip() -> None:
    for n in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        assert rowswire._read_varint(memoryview(rowswire.varint(n)), 0) == (n, len(rowswire.varint(n)))
