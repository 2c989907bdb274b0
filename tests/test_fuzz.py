"""Property-based fuzzing of the Generator and LogitService RPCs over a loopback mesh (issue 10,
point 7, first part): generated requests and raw bytes never get INTERNAL or UNKNOWN, and a valid
request afterwards returns what it returned before."""

from __future__ import annotations

import grpc
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eftmesh.v1 import generator_pb2, logit_pb2, tensor_pb2  # noqa: E402

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
ROLES = ["base-large", "base-small", "ft-small"]

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1e-45, 1.0, 3e38]))
doubles = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e4, 1e308]))
names = st.one_of(st.sampled_from(ROLES), st.text(max_size=20), st.text(min_size=129, max_size=300))
sampling = st.builds(tensor_pb2.SamplingParams, temperature=floats, top_p=floats,
                     top_k=st.integers(-(2**31), 2**31 - 1))
delta = st.builds(generator_pb2.Delta, tuned=names, reference=names, weight=doubles)
complete = st.builds(
    generator_pb2.CompleteRequest,
    prompt=st.text(max_size=60),
    composition=st.builds(generator_pb2.Composition, base=names, deltas=st.lists(delta, max_size=3)),
    sampling=sampling,
    seed=st.integers(0, 2**64 - 1),
    max_new_tokens=st.integers(0, 8),
    stop=st.lists(st.text(max_size=10), max_size=18),
    speculation=st.builds(generator_pb2.Speculation, mode=st.integers(0, 4), block_size=st.integers(0, 40),
                          draft_role=st.one_of(st.just(""), names)),
    logprobs=st.booleans(),
)
item = st.builds(logit_pb2.ScoreItem,
                 session_id=st.text(max_size=300), start=st.integers(0, 200),
                 tokens=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8), rows=st.integers(0, 10))
score_batch = st.builds(logit_pb2.ScoreBatchRequest, items=st.lists(item, max_size=4))


def check(fn) -> None:
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() not in BAD, (e.code(), e.details())


def reference(mesh):
    r = mesh.generator.Complete(generator_pb2.CompleteRequest(prompt="The quick brown fox", max_new_tokens=3, seed=1,
                                                              sampling=tensor_pb2.SamplingParams(temperature=0.0)), timeout=30)
    return list(r.token_ids)


def test_fuzz_complete(mesh):
    before = reference(mesh)

    @FUZZ
    @given(complete)
    def run(req):
        req.max_new_tokens = min(req.max_new_tokens, 3)
        check(lambda: mesh.generator.Complete(req, timeout=30))

    run()
    assert reference(mesh) == before


def test_fuzz_score_batch(mesh):
    before = reference(mesh)
    stub = mesh.logit_stub("base-small")

    @FUZZ
    @given(score_batch)
    def run(req):
        check(lambda: stub.ScoreBatch(req, timeout=30))
        for it in req.items:
            if it.session_id and len(it.session_id.encode()) <= 256:
                check(lambda sid=it.session_id: stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=30))

    run()
    assert reference(mesh) == before


def test_fuzz_raw_bytes(mesh):
    before = reference(mesh)
    port = mesh.logits["base-large"].server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as logit_channel:
        calls = [mesh.channel.unary_unary("/eftmesh.v1.Generator/Complete"),
                 mesh.channel.unary_unary("/eftmesh.v1.Generator/Info"),
                 logit_channel.unary_unary("/eftmesh.v1.LogitService/ScoreBatch"),
                 logit_channel.unary_unary("/eftmesh.v1.LogitService/Release")]

        @FUZZ
        @given(st.binary(max_size=64), st.integers(0, len(calls) - 1))
        def run(data, which):
            check(lambda: calls[which](data, timeout=30))

        run()
    assert reference(mesh) == before
