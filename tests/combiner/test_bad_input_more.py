"""Issue 10, points 3 and 4: limits, and no INTERNAL for any input, over a real loopback mesh.

Each case asserts the exact status, a short message, and that a valid request afterwards
returns what it returned before (the service stays healthy and deterministic)."""

from __future__ import annotations

import grpc
import pytest

from eftmesh.combiner.decoding import PROMPT_CHARS_PER_TOKEN
from eftmesh.combiner.decoding import MAX_STOP_CHARS, MAX_STOP_STRINGS
from eftmesh.core.mixing import MAX_ROLE_NAME_BYTES
from eftmesh.common.interceptor import MAX_DETAILS_CHARS
from eftmesh.core.mixing import MAX_WEIGHT
from eftmesh.logit.admission import MAX_SESSION_ID_BYTES
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, logit_pb2, tensor_pb2

from conftest import start_combiner
from test_bad_input import CALLS, CONTEXT, composition, delta, request, sampling

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

OFF = generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_OFF)
FIXED = generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_FIXED, k=3, draft_role="ft-small")
SPEC = {"off": OFF, "fixed": FIXED}
HUGE = "x" * (1 << 20)  # 1 MiB of caller input


def reference(stub) -> tuple[list[int], str]:
    r = stub.Complete(request(generator_pb2.CompleteRequest, max_new_tokens=4), timeout=30)
    return list(r.token_ids), r.text


@pytest.fixture(scope="module")
def before(mesh):
    return reference(mesh.generator)


def assert_same_as_before(mesh, before) -> None:
    assert reference(mesh.generator) == before


def expect(code, fn, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    details = e.value.details() or ""
    assert "internal" not in details.lower()
    assert len(details) <= MAX_DETAILS_CHARS
    return details


# --- extreme but finite numbers: they work --------------------------------------------------

WORKING = [
    ("temperature 1e-45 is greedy", dict(sampling=sampling(temperature=1e-45))),
    ("temperature 1e-6 is greedy", dict(sampling=sampling(temperature=1e-6))),
    ("temperature 1e-3", dict(sampling=sampling(temperature=1e-3))),
    ("temperature 3e38", dict(sampling=sampling(temperature=3e38))),
    ("top_p 1e-45", dict(sampling=sampling(temperature=1.0, top_p=1e-45))),
    ("top_k 2**31-1", dict(sampling=sampling(temperature=1.0, top_k=2**31 - 1))),
    ("weight at the bound", dict(composition=composition(deltas=[delta(weight=MAX_WEIGHT)]))),
    ("negative weight at the bound", dict(composition=composition(deltas=[delta(weight=-MAX_WEIGHT)]))),
    ("two opposite huge weights", dict(composition=composition(deltas=[delta(weight=MAX_WEIGHT), delta(weight=-MAX_WEIGHT)]))),
    ("tiny weight", dict(composition=composition(deltas=[delta(weight=1e-308)]))),
    ("seed 2**64-1", dict(seed=2**64 - 1, sampling=sampling(temperature=1.0))),
]


@pytest.mark.parametrize("spec", list(SPEC))
@pytest.mark.parametrize("rpc", list(CALLS))
@pytest.mark.parametrize("fields", [c[1] for c in WORKING], ids=[c[0] for c in WORKING])
def test_extreme_finite_numbers_work(mesh, before, rpc, spec, fields):
    out = CALLS[rpc](mesh.generator, speculation=SPEC[spec], **fields)
    last = out[-1] if isinstance(out, list) else out
    assert last.finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
    assert_same_as_before(mesh, before)


def test_tiny_temperature_is_greedy(mesh):
    greedy = CALLS["Complete"](mesh.generator, max_new_tokens=6, sampling=sampling(temperature=0.0))
    for spec in SPEC.values():
        for t in (1e-45, 1e-7):
            tiny = CALLS["Complete"](mesh.generator, max_new_tokens=6, speculation=spec, sampling=sampling(temperature=t), seed=7)
            assert list(tiny.token_ids) == list(greedy.token_ids)


# --- out of range: INVALID_ARGUMENT with the allowed range ----------------------------------

REFUSED = [
    ("weight 1e308", dict(composition=composition(deltas=[delta(weight=1e308)])), ["deltas[0].weight", f"{MAX_WEIGHT:g}"]),
    ("second weight -1e308", dict(composition=composition(deltas=[delta(), delta(weight=-1e308)])), ["deltas[1].weight", f"{MAX_WEIGHT:g}"]),
    ("weight just over the bound", dict(composition=composition(deltas=[delta(weight=MAX_WEIGHT * 1.001)])), ["deltas[0].weight"]),
    ("17 stop strings", dict(stop=["a"] * (MAX_STOP_STRINGS + 1)), ["stop", str(MAX_STOP_STRINGS)]),
    ("a stop string too long", dict(stop=["y" * (MAX_STOP_CHARS + 1)]), ["stop[0]", str(MAX_STOP_CHARS)]),
    ("1 MiB stop string", dict(stop=[HUGE]), ["stop[0]", str(MAX_STOP_CHARS)]),
    ("1 MiB base role", dict(composition=composition(base=HUGE)), ["composition.base", str(MAX_ROLE_NAME_BYTES)]),
    ("1 MiB tuned role", dict(composition=composition(deltas=[delta(tuned=HUGE)])), ["deltas[0].tuned", str(MAX_ROLE_NAME_BYTES)]),
    ("1 MiB draft role", dict(speculation=generator_pb2.Speculation(draft_role=HUGE)), ["draft_role", str(MAX_ROLE_NAME_BYTES)]),
    ("long prompt refused before tokenising", dict(prompt="z" * (CONTEXT * PROMPT_CHARS_PER_TOKEN + 1)), ["prompt", "characters", "shorten"]),
    ("3 MB prompt", dict(prompt="z" * 3_000_000), ["prompt", "characters", "shorten"]),
]


@pytest.mark.parametrize("rpc", list(CALLS))
@pytest.mark.parametrize("fields,fragments", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_out_of_range_is_invalid_argument(mesh, before, rpc, fields, fragments):
    details = expect(grpc.StatusCode.INVALID_ARGUMENT, CALLS[rpc], mesh.generator, **fields)
    for f in fragments:
        assert f in details
    assert_same_as_before(mesh, before)


@pytest.mark.parametrize("rpc", ["Complete", "Generate"])
def test_a_6_mb_request_is_refused_before_it_is_read(mesh, before, rpc):
    """Over the combiner's client-facing receive limit (--max-request-bytes, 4 MiB by default)
    gRPC refuses the request itself: RESOURCE_EXHAUSTED, and nothing is tokenised."""
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, CALLS[rpc], mesh.generator, prompt="z" * 6_000_000)
    assert_same_as_before(mesh, before)


def test_limits_at_their_values_are_accepted(mesh, before):
    r = CALLS["Complete"](mesh.generator, stop=["\x00" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)
    assert r.finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
    name = "r" * MAX_ROLE_NAME_BYTES  # at the limit: an unknown role, not an over-long one
    details = expect(grpc.StatusCode.NOT_FOUND, CALLS["Complete"], mesh.generator, composition=composition(base=name))
    assert name[:50] in details
    assert_same_as_before(mesh, before)


def test_unknown_long_role_message_is_short(mesh, before):
    name = "é" * 100  # 100 characters, 200 bytes: over the byte limit
    expect(grpc.StatusCode.INVALID_ARGUMENT, CALLS["Complete"], mesh.generator, composition=composition(base=name))
    assert_same_as_before(mesh, before)


# --- bytes that are not a request: INVALID_ARGUMENT ------------------------------------------

def _field(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payload under 128 bytes)."""
    return bytes([num << 3 | 2, len(payload)]) + payload


LONE_SURROGATE = b"\xed\xa0\x80"
BAD_BYTES = [
    ("garbage", b"\xff\xff\xff"),
    ("truncated varint", b"\x08\xff"),
    ("length past the end", b"\x0a\x7fabc"),
    ("invalid wire type", b"\x0f\x00"),
    ("field number 0", b"\x02\x00"),
    ("lone surrogate in field 1", _field(1, LONE_SURROGATE)),
    ("invalid UTF-8 in field 1", _field(1, b"ab\xff\xfe")),
]

GENERATOR_METHODS = ["/eftmesh.v1.Generator/Complete", "/eftmesh.v1.Generator/Info"]
LOGIT_METHODS = ["/eftmesh.v1.LogitService/Score", "/eftmesh.v1.LogitService/Release",
                 "/eftmesh.v1.LogitService/ScoreBatch", "/eftmesh.v1.LogitService/Info"]


@pytest.mark.parametrize("data", [c[1] for c in BAD_BYTES], ids=[c[0] for c in BAD_BYTES])
def test_bytes_that_are_not_a_request_are_invalid_argument(mesh, before, data):
    for method in GENERATOR_METHODS:
        call = mesh.channel.unary_unary(method)
        try:
            call(data, timeout=30)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.code(), e.details())
            assert len(e.details()) <= MAX_DETAILS_CHARS
    stream = mesh.channel.unary_stream("/eftmesh.v1.Generator/Generate")
    try:
        list(stream(data, timeout=30))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    port = mesh.logits["base-large"].server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for method in LOGIT_METHODS:
            try:
                ch.unary_unary(method)(data, timeout=30)
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (method, e.code(), e.details())
    assert_same_as_before(mesh, before)


def test_lone_surrogate_in_prompt_is_invalid_argument(mesh, before):
    # field 1 of CompleteRequest is the prompt; the rest of the request is fine
    good = request(generator_pb2.CompleteRequest).SerializeToString()
    for rpc in ("Complete", "Generate"):
        m = f"/eftmesh.v1.Generator/{rpc}"
        call = mesh.channel.unary_unary(m) if rpc == "Complete" else mesh.channel.unary_stream(m)
        with pytest.raises(grpc.RpcError) as e:
            r = call(good + _field(1, b"ok" + LONE_SURROGATE), timeout=30)
            if rpc == "Generate":
                list(r)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert_same_as_before(mesh, before)


# --- session ids at a logit service --------------------------------------------------------

def test_session_id_length_is_limited_and_not_echoed(mesh, before):
    stub = mesh.logit_stub("base-small")
    for sid in (HUGE, "s" * (MAX_SESSION_ID_BYTES + 1), "é" * (MAX_SESSION_ID_BYTES // 2 + 1)):
        details = expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Score,
                         logit_pb2.ScoreRequest(session_id=sid, start=0, tokens=[1, 2], rows=1), timeout=30)
        assert "256" in details
        expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Release, logit_pb2.ReleaseRequest(session_id=sid), timeout=30)
        expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Draft,
               logit_pb2.DraftRequest(session_id=sid, start=0, tokens=[1], k=1), timeout=30)
    # a long unknown id within the limit: NOT_FOUND (start > 0), with a short message
    sid = "q" * MAX_SESSION_ID_BYTES
    details = expect(grpc.StatusCode.NOT_FOUND, stub.Score,
                     logit_pb2.ScoreRequest(session_id=sid, start=3, tokens=[1], rows=1), timeout=30)
    assert len(details) < 400
    ok = stub.Score(logit_pb2.ScoreRequest(session_id="s" * MAX_SESSION_ID_BYTES, start=0, tokens=[1, 2], rows=1), timeout=30)
    assert ok.cache_length == 2
    assert stub.Release(logit_pb2.ReleaseRequest(session_id="s" * MAX_SESSION_ID_BYTES), timeout=30).released
    assert_same_as_before(mesh, before)


def test_draft_with_extreme_sampling_works(mesh, before):
    stub = mesh.logit_stub("ft-small")
    for i, s in enumerate((tensor_pb2.SamplingParams(temperature=1e-45), tensor_pb2.SamplingParams(temperature=3e38),
                           tensor_pb2.SamplingParams(temperature=1.0, top_p=1e-45))):
        sid = f"extreme-{i}"
        r = stub.Draft(logit_pb2.DraftRequest(session_id=sid, start=0, tokens=[1, 2, 3], k=2, sampling=s, seed=1), timeout=30)
        assert len(r.tokens) == 2
        stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=30)
    assert_same_as_before(mesh, before)


def test_a_request_over_the_client_facing_limit_is_resource_exhausted_before_it_is_read(mesh, tiny_family):
    """The combiner reads at most --max-request-bytes from a client (default 4 MiB): a bigger
    request is refused by gRPC itself, and the server stays up."""
    ports = {r: ls.server.port for r, ls in mesh.logits.items()}
    cs = start_combiner(tiny_family["base-small"], ports, max_request_bytes=64 * 1024)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{cs.server.port}") as ch:
            stub = generator_pb2_grpc.GeneratorStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Complete(generator_pb2.CompleteRequest(prompt="x" * (100 * 1024), max_new_tokens=2), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            ok = stub.Complete(generator_pb2.CompleteRequest(prompt="The quick brown fox", max_new_tokens=2), timeout=10)
            assert len(ok.token_ids) == 2
    finally:
        cs.stop(0)


def test_reflection_can_be_turned_off(mesh, tiny_family):
    """--no-reflection: nothing lists the API (grpcurl and ghz then need the protos)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ports = {r: ls.server.port for r, ls in mesh.logits.items()}
    cs = start_combiner(tiny_family["base-small"], ports, reflection=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{cs.server.port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        cs.stop(0)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.combiner.server.port}") as ch:  # on by default
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert any(s.name == "eftmesh.v1.Generator" for s in resp.list_services_response.service)
