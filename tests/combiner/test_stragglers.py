"""A replica that has not answered a step's call within `--upstream-straggler-factor` times its
role's usual call: when is that a straggler (its generations sit the step out, the others step
on) and when a slow step (everybody waits)?

GrpcScorer over fake stubs (no network): one replica's DraftBatch is a future the test ends."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future

import pytest

from eftmesh.combiner.monitor import LIVE
from eftmesh.combiner.scoring import DraftCall
from eftmesh.combiner.upstream import GrpcScorer
from eftmesh.core.sampling import SamplingConfig
from eftmesh.v1 import logit_pb2

CALL_S = 0.05  # the role's usual call, as the deadlines learned it: a straggler after 2x, 0.1 s


class LateStub:
    """A replica whose DraftBatch answers only when the test says (`answer`)."""

    def __init__(self) -> None:
        self.call: Future = Future()  # the call in flight

    @property
    def DraftBatch(self):  # noqa: N802 (the gRPC method's name)
        return self

    def future(self, request, timeout) -> Future:  # what `stub.DraftBatch.future(...)` returns
        return self.call

    def answer(self) -> None:
        # an item error: an answer the combiner passes on as the item's outcome, not a move
        if not self.call.done():
            self.call.set_result(logit_pb2.DraftBatchResponse(results=[logit_pb2.ItemResult(
                code=8, message="the test's answer")]))


@pytest.fixture
def late():
    """A GrpcScorer whose two ft-small replicas are live; the session "s" is on the one whose
    stub is late (the other could take its sessions over, so the call may be set aside)."""
    scorer = GrpcScorer({"ft-small": "a:1,b:2"})
    rs = scorer.replicas["ft-small"]
    for r in rs.replicas():
        scorer._set_state("ft-small", r, LIVE)
    stub = LateStub()
    rs.route("s").stub = stub
    scorer.deadlines.record("ft-small", CALL_S, 1)
    call = DraftCall("ft-small", "s", [1, 2, 3, 4], 3, 2, SamplingConfig(temperature=0.0), 0, 384)
    late_answer = threading.Timer(3.0, stub.answer)  # a waiting call ends, late, and the test fails
    late_answer.start()
    try:
        yield scorer, stub, call
    finally:
        late_answer.cancel()
        stub.answer()
        scorer.close()


def test_a_late_replica_carrying_the_whole_call_is_set_aside_when_the_step_has_others_to_step(late):
    """All the step's drafting generations on one replica, which does not answer: the step's
    other generations (not drafting) go on after the straggler wait, not the call's deadline."""
    scorer, stub, call = late
    started = time.monotonic()
    (got,) = scorer.draft_batch("ft-small", [call], partial=True)
    waited = time.monotonic() - started
    assert got.pending is not None
    assert got.error is None and got.rows is None
    assert not got.pending.done()  # it was set aside before the replica answered
    # the straggler wait is 2 x CALL_S; waiting for the call would take the 3 s of the late answer
    assert 2 * CALL_S * 0.9 <= waited < 2.0, f"waited {waited:.3f} s"
    stub.answer()
    got.pending.result(timeout=5)  # the call runs on to its answer, which ends the hold


def test_a_late_replica_carrying_the_whole_step_is_waited_for(late):
    """The same late call with nothing else in the step (not `partial`): a slow step, and the
    call's answer is its outcome, not a hold (sitting out would only redo the same call)."""
    scorer, stub, call = late
    timer = threading.Timer(0.4, stub.answer)  # 8x the usual call: well past the straggler wait
    timer.start()
    try:
        started = time.monotonic()
        (got,) = scorer.draft_batch("ft-small", [call], partial=False)
        waited = time.monotonic() - started
    finally:
        timer.join()
    assert got.pending is None
    assert got.error is not None and "the test's answer" in str(got.error)
    assert waited >= 0.35


def test_a_long_draft_is_given_the_time_of_its_forwards_before_it_counts_as_late(late):
    """A DraftBatch of k = 8 runs nine forwards one after another: with the role's forwards
    taking 50 ms, it is a straggler only after 2 x 9 x 50 ms, not after 2 x 50 ms (which would
    set every long draft aside, every step, while the step had others to step)."""
    scorer, stub, call = late
    timer = threading.Timer(0.3, stub.answer)  # 6x one forward, well within nine
    timer.start()
    try:
        (got,) = scorer.draft_batch("ft-small", [dataclasses.replace(call, k=8)], partial=True)
    finally:
        timer.join()
    assert got.pending is None and got.error is not None and "the test's answer" in str(got.error)
