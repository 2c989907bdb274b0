"""LogitService over loopback gRPC against one tiny random GPT-2 made in the test."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch
from conftest import start_logit
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from eftmesh.common.serving import ServerConfig
from eftmesh.common.tensors import from_pb
from eftmesh.common.tokenizer import fingerprint
from eftmesh.logit.engine import ModelEngine
from eftmesh.logit.server import LogitConfig, LogitServer
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import logit_pb2, logit_pb2_grpc, tensor_pb2

ROLE = "base-small"
MAX_CONTEXT = 32
MAX_SESSIONS = 2
VOCAB = 384  # eftmesh.demo.tiny.make_tokenizer's default; the tiny models have no padding rows
TOKENS = [5, 17, 99, 200, 3, 42, 383, 0, 121, 7]


@pytest.fixture(scope="module")
def model_dir(tiny_family: dict[str, Path]) -> Path:
    return tiny_family[ROLE]


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[LogitServer]:
    ls = start_logit(model_dir, ROLE, max_sessions=MAX_SESSIONS, max_context=MAX_CONTEXT)
    yield ls
    ls.server.stop(0).wait()


@pytest.fixture(scope="module")
def channel(server: LogitServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{server.server.port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> logit_pb2_grpc.LogitServiceStub:
    return logit_pb2_grpc.LogitServiceStub(channel)


@pytest.fixture(scope="module")
def reference_logprobs(model_dir: Path) -> torch.Tensor:
    """[len(TOKENS), vocab] log-probs from transformers itself, no eftmesh code involved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0]  # [n, vocab]
    return torch.log_softmax(logits.float(), dim=-1)


def new_session() -> str:
    return f"test-{uuid.uuid4().hex}"


def score(
    stub: logit_pb2_grpc.LogitServiceStub,
    session_id: str,
    start: int,
    tokens: Sequence[int],
    rows: int,
    dtype: int = tensor_pb2.DTYPE_UNSPECIFIED,
) -> logit_pb2.ScoreResponse:
    req = logit_pb2.ScoreRequest(session_id=session_id, start=start, tokens=tokens, rows=rows, dtype=dtype)
    return stub.Score(req, timeout=30)


def assert_still_serves(stub: logit_pb2_grpc.LogitServiceStub) -> None:
    resp = score(stub, new_session(), 0, TOKENS[:3], 1)
    assert resp.cache_length == 3
    assert list(resp.logprobs.shape) == [1, VOCAB]


def expect_error(stub, code: grpc.StatusCode, *args, **kwargs) -> str:
    """Send a bad Score, check its status, check the service still answers; return the message."""
    with pytest.raises(grpc.RpcError) as e:
        score(stub, *args, **kwargs)
    assert e.value.code() == code, e.value.details()
    assert_still_serves(stub)
    return e.value.details()


# --- Info -------------------------------------------------------------------------------------


def test_info_describes_the_hosted_model(stub, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    info = stub.Info(logit_pb2.LogitServiceInfoRequest(), timeout=10)
    assert info.model_id == str(model_dir)
    assert info.role == ROLE
    assert info.vocab_size == VOCAB
    assert info.tokenizer_vocab_size == len(tok) == VOCAB
    assert info.tokenizer_fingerprint == fingerprint(tok)
    assert info.max_context == MAX_CONTEXT
    assert info.dtype == "float32"
    assert info.device == "cpu"
    assert info.max_sessions == MAX_SESSIONS
    assert info.session_idle_timeout_s > 0
    assert info.eos_token_id == tok.eos_token_id


# --- Score: values ----------------------------------------------------------------------------


def test_score_returns_float32_logprobs_equal_to_transformers(stub, reference_logprobs):
    resp = score(stub, new_session(), 0, TOKENS, len(TOKENS))
    assert resp.logprobs.dtype == tensor_pb2.DTYPE_FLOAT32
    assert list(resp.logprobs.shape) == [len(TOKENS), VOCAB]
    assert resp.cache_length == len(TOKENS)
    lp = from_pb(resp.logprobs)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, reference_logprobs, atol=1e-5, rtol=0)


def test_score_returns_only_the_last_rows(stub, reference_logprobs):
    lp = from_pb(score(stub, new_session(), 0, TOKENS, 3).logprobs)
    torch.testing.assert_close(lp, reference_logprobs[-3:], atol=1e-5, rtol=0)


def test_incremental_score_equals_one_full_prefix_score(stub, reference_logprobs):
    sid = new_session()
    rows = []
    for i, t in enumerate(TOKENS):
        resp = score(stub, sid, i, [t], 1)
        assert resp.cache_length == i + 1
        rows.append(from_pb(resp.logprobs))
    incremental = torch.cat(rows)  # [n, vocab]
    full = from_pb(score(stub, new_session(), 0, TOKENS, len(TOKENS)).logprobs)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(incremental, reference_logprobs, atol=1e-5, rtol=0)


def test_rollback_gives_the_same_rows_as_a_fresh_session(stub):
    sid = new_session()
    score(stub, sid, 0, TOKENS, 1)
    other = [11, 12, 13]
    rolled = score(stub, sid, 4, other, 3)  # cut back from 10 cached tokens to 4
    assert rolled.cache_length == 7
    fresh = score(stub, new_session(), 0, TOKENS[:4] + other, 3)
    torch.testing.assert_close(from_pb(rolled.logprobs), from_pb(fresh.logprobs), atol=1e-5, rtol=0)
    # and the rolled-back session keeps going from its new length
    nxt = score(stub, sid, 7, [50], 1)
    ref = score(stub, new_session(), 0, TOKENS[:4] + other + [50], 1)
    torch.testing.assert_close(from_pb(nxt.logprobs), from_pb(ref.logprobs), atol=1e-5, rtol=0)


def test_rollback_to_zero_restarts_the_session(stub, reference_logprobs):
    sid = new_session()
    score(stub, sid, 0, [1, 2, 3, 4], 1)
    resp = score(stub, sid, 0, TOKENS, len(TOKENS))
    assert resp.cache_length == len(TOKENS)
    torch.testing.assert_close(from_pb(resp.logprobs), reference_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "dtype,torch_dtype,tol",
    [
        (tensor_pb2.DTYPE_FLOAT32, torch.float32, 0.0),
        (tensor_pb2.DTYPE_FLOAT16, torch.float16, 1e-3),
        (tensor_pb2.DTYPE_BFLOAT16, torch.bfloat16, 8e-3),
    ],
)
def test_score_encodes_the_requested_dtype_close_to_float32(stub, reference_logprobs, dtype, torch_dtype, tol):
    resp = score(stub, new_session(), 0, TOKENS, len(TOKENS), dtype=dtype)
    assert resp.logprobs.dtype == dtype
    assert list(resp.logprobs.shape) == [len(TOKENS), VOCAB]
    assert len(resp.logprobs.data) == len(TOKENS) * VOCAB * torch.empty((), dtype=torch_dtype).element_size()
    lp = from_pb(resp.logprobs)
    assert lp.dtype == torch_dtype
    # Rounding to a 16-bit float is relative: 2^-11 (float16) or 2^-8 (bfloat16) of the value.
    torch.testing.assert_close(lp.float(), reference_logprobs, rtol=tol, atol=1e-5)


def test_rows_zero_fills_the_cache_and_returns_an_empty_block(stub, reference_logprobs):
    sid = new_session()
    resp = score(stub, sid, 0, TOKENS[:-1], 0)
    assert resp.cache_length == len(TOKENS) - 1
    assert list(resp.logprobs.shape) == [0, VOCAB]
    assert from_pb(resp.logprobs).shape == (0, VOCAB)
    nxt = score(stub, sid, len(TOKENS) - 1, TOKENS[-1:], 1)
    torch.testing.assert_close(from_pb(nxt.logprobs), reference_logprobs[-1:], atol=1e-5, rtol=0)


def test_score_up_to_exactly_the_max_context_is_allowed(stub):
    resp = score(stub, new_session(), 0, [7] * MAX_CONTEXT, 1)
    assert resp.cache_length == MAX_CONTEXT


# --- Score: bad input -------------------------------------------------------------------------


def test_unknown_session_with_start_above_zero_is_not_found(stub):
    msg = expect_error(stub, grpc.StatusCode.NOT_FOUND, new_session(), 3, [1], 1)
    assert "start=0" in msg


def test_a_gap_after_the_cached_length_is_failed_precondition(stub):
    sid = new_session()
    score(stub, sid, 0, TOKENS[:3], 1)
    msg = expect_error(stub, grpc.StatusCode.FAILED_PRECONDITION, sid, 5, [1], 1)
    assert "5" in msg and "3" in msg
    # the session is untouched and can go on from where it was
    assert score(stub, sid, 3, [1], 1).cache_length == 4


def test_past_the_max_context_is_out_of_range(stub):
    msg = expect_error(stub, grpc.StatusCode.OUT_OF_RANGE, new_session(), 0, [7] * (MAX_CONTEXT + 1), 1)
    assert str(MAX_CONTEXT) in msg


def test_appending_past_the_max_context_is_out_of_range_and_keeps_the_session(stub):
    sid = new_session()
    score(stub, sid, 0, [7] * (MAX_CONTEXT - 2), 1)
    expect_error(stub, grpc.StatusCode.OUT_OF_RANGE, sid, MAX_CONTEXT - 2, [7, 7, 7], 1)
    assert score(stub, sid, MAX_CONTEXT - 2, [7, 7], 1).cache_length == MAX_CONTEXT


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_token_id_outside_the_vocabulary_is_invalid_argument(stub, bad):
    msg = expect_error(stub, grpc.StatusCode.INVALID_ARGUMENT, new_session(), 0, [1, bad, 2], 1)
    assert str(bad) in msg and str(VOCAB) in msg


def test_empty_tokens_is_invalid_argument(stub):
    msg = expect_error(stub, grpc.StatusCode.INVALID_ARGUMENT, new_session(), 0, [], 0)
    assert "tokens" in msg


def test_empty_session_id_is_invalid_argument(stub):
    msg = expect_error(stub, grpc.StatusCode.INVALID_ARGUMENT, "", 0, [1, 2], 1)
    assert "session_id" in msg


def test_more_rows_than_tokens_is_invalid_argument(stub):
    msg = expect_error(stub, grpc.StatusCode.INVALID_ARGUMENT, new_session(), 0, [1, 2], 3)
    assert "rows" in msg


def test_unknown_dtype_is_invalid_argument(stub):
    msg = expect_error(stub, grpc.StatusCode.INVALID_ARGUMENT, new_session(), 0, [1, 2], 1, dtype=99)
    assert "dtype" in msg


# --- Sessions over gRPC -----------------------------------------------------------------------


def test_a_new_session_past_the_cap_evicts_the_least_recently_used(stub):
    a, b, c = new_session(), new_session(), new_session()
    score(stub, a, 0, TOKENS[:3], 1)
    score(stub, b, 0, TOKENS[:3], 1)
    score(stub, a, 3, TOKENS[3:4], 1)  # a is now the more recently used
    score(stub, c, 0, TOKENS[:3], 1)  # the cap is 2: b goes
    with pytest.raises(grpc.RpcError) as e:
        score(stub, b, 3, TOKENS[3:4], 1)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert score(stub, a, 4, TOKENS[4:5], 1).cache_length == 5
    # an evicted session is only a cache miss: re-sending the prefix from 0 works
    assert score(stub, b, 0, TOKENS[:4], 1).cache_length == 4


def test_release_drops_the_session_once(stub):
    sid = new_session()
    score(stub, sid, 0, TOKENS[:3], 1)
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=10).released is True
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=10).released is False
    with pytest.raises(grpc.RpcError) as e:
        score(stub, sid, 3, [1], 1)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_release_of_an_unknown_session_is_not_an_error(stub):
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=new_session()), timeout=10).released is False


# --- Health, reflection, graceful stop --------------------------------------------------------


@pytest.mark.parametrize("service", ["", "eftmesh.v1.LogitService"])
def test_health_reports_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_logit_service(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    assert "eftmesh.v1.LogitService" in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName("eftmesh.v1.LogitService")
    assert {m.name for m in svc.methods} == {"Info", "Score", "Draft", "Release"}
    assert svc.FindMethodByName("Score").input_type.full_name == "eftmesh.v1.ScoreRequest"


class GatedEngine(ModelEngine):
    """A real engine whose Score waits for the test to open a gate (to hold a call in flight)."""

    entered: threading.Event
    gate: threading.Event

    def score(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().score(*args, **kwargs)


def test_graceful_stop_lets_an_in_flight_call_finish(model_dir):
    engine = GatedEngine.from_pretrained(str(model_dir), role=ROLE)
    engine.entered, engine.gate = threading.Event(), threading.Event()
    cfg = LogitConfig(model=str(model_dir), role=ROLE, server=ServerConfig(host="127.0.0.1", port=0, grace_s=1.0))
    ls = build_logit(cfg, engine=engine)
    ls.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{ls.server.port}")
    try:
        st = logit_pb2_grpc.LogitServiceStub(ch)
        fut = st.Score.future(logit_pb2.ScoreRequest(session_id="s", start=0, tokens=TOKENS, rows=1), timeout=30)
        assert engine.entered.wait(timeout=10)
        stopped = ls.server.stop(grace_s=10)
        assert not stopped.is_set()  # still draining the call held at the gate
        engine.gate.set()
        resp = fut.result()
        assert resp.cache_length == len(TOKENS)
        assert list(resp.logprobs.shape) == [1, VOCAB]
        assert stopped.wait(timeout=10)
    finally:
        engine.gate.set()
        ls.server.stop(0)
        ch.close()
