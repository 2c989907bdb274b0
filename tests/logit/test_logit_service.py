"""LogitService over loopback gRPC against one tiny random GPT-2 made in the test."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
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
from eftmesh.core import fusedrows
from eftmesh.core.draws import LOG2E
from eftmesh.core.sampling import SamplingConfig, token_probs
from eftmesh.logit.engine import ModelEngine
from eftmesh.logit.server import LogitConfig, LogitServer
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import logit_pb2, logit_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.e2e

ROLE = "base-small"
MAX_CONTEXT = 32
MAX_SESSIONS = 2
VOCAB = 384  # eftmesh.tiny.make_tokenizer's default; the tiny models have no padding rows
TOKENS = [5, 17, 99, 200, 3, 42, 383, 0, 121, 7]


@pytest.fixture(scope="module")
def model_dir(tiny_family: dict[str, Path]) -> Path:
    return tiny_family[ROLE]


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[LogitServer]:
    # session_active_s=0: eviction tests need just-used sessions to count as idle
    ls = start_logit(model_dir, ROLE, max_sessions=MAX_SESSIONS, max_context=MAX_CONTEXT, session_active_s=0.0)
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
    # the paged KV cache: the defaults, allocated at start (warmup), close to theoretical bytes per token
    assert info.kv_cache_tokens == 16384
    assert info.kv_block_size == 16
    assert info.max_batch == 64
    assert info.kv_bytes_per_token_theoretical > 0
    assert info.kv_bytes_per_token_theoretical <= info.kv_bytes_per_token <= 1.25 * info.kv_bytes_per_token_theoretical


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


def test_one_release_drops_every_session_it_names(stub):
    """Release's `session_ids` (Info.release_many): the combiner's finished sessions in one call
    where no batched call will carry them; `released` says whether any cache was held."""
    assert stub.Info(logit_pb2.LogitServiceInfoRequest(), timeout=10).release_many is True
    a, b, c = new_session(), new_session(), new_session()
    for sid in (a, b, c):
        score(stub, sid, 0, TOKENS[:3], 1)
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=a, session_ids=[b, new_session()]), timeout=10).released
    for sid in (a, b):
        assert stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=10).released is False
    assert stub.Release(logit_pb2.ReleaseRequest(session_ids=[new_session(), c]), timeout=10).released is True
    assert stub.Release(logit_pb2.ReleaseRequest(session_ids=[a, c]), timeout=10).released is False
    d = new_session()
    score(stub, d, 0, TOKENS[:3], 1)
    for bad in (logit_pb2.ReleaseRequest(), logit_pb2.ReleaseRequest(session_id=d, session_ids=["x" * 300])):
        with pytest.raises(grpc.RpcError) as e:  # an empty or over-long id anywhere: nothing dropped
            stub.Release(bad, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=d), timeout=10).released is True


def test_a_batched_call_drops_the_sessions_its_release_names_before_its_items(stub):
    """ScoreBatch's and DraftBatch's `release` (Info.batch_release): what the combiner's next
    call carries instead of a Release each; unknown ids are ignored."""
    assert stub.Info(logit_pb2.LogitServiceInfoRequest(), timeout=10).batch_release is True
    a, b, c = new_session(), new_session(), new_session()
    for sid in (a, b):
        score(stub, sid, 0, TOKENS[:3], 1)
    resp = stub.ScoreBatch(logit_pb2.ScoreBatchRequest(items=[score_item(c, 0, TOKENS[:2], 1)],
                                                       release=[a, new_session()]), timeout=30)
    assert [r.code for r in resp.results] == [OK]
    stub.DraftBatch(logit_pb2.DraftBatchRequest(items=[draft_item(c, 2, TOKENS[2:3], 1, seed=0)], release=[b]),
                    timeout=30)
    for sid in (a, b):  # gone: a Release finds nothing, a call past the prompt NOT_FOUND
        assert stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=10).released is False
        with pytest.raises(grpc.RpcError) as e:
            score(stub, sid, 3, [1], 1)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=c), timeout=10).released is True


# --- ScoreBatch / DraftBatch ------------------------------------------------------------------

BATCH_KV_TOKENS, BATCH_BLOCK = 64, 8  # 8 blocks: four sessions of MAX_CONTEXT tokens fill the pool twice over
OK = grpc.StatusCode.OK.value[0]


@pytest.fixture(scope="module")
def batch_stub(model_dir: Path) -> Iterator[logit_pb2_grpc.LogitServiceStub]:
    """A service of its own for batched calls: more sessions than a batch holds, a small KV pool."""
    ls = start_logit(model_dir, ROLE, max_sessions=64, max_context=MAX_CONTEXT, session_active_s=0.0,
                     kv_cache_tokens=BATCH_KV_TOKENS, kv_block_size=BATCH_BLOCK, max_batch=4)
    ch = grpc.insecure_channel(f"127.0.0.1:{ls.server.port}")
    yield logit_pb2_grpc.LogitServiceStub(ch)
    ch.close()
    ls.server.stop(0).wait()


def score_item(session_id: str, start: int, tokens: Sequence[int], rows: int) -> logit_pb2.ScoreItem:
    return logit_pb2.ScoreItem(session_id=session_id, start=start, tokens=tokens, rows=rows)


def draft_item(session_id: str, start: int, tokens: Sequence[int], k: int, seed: int,
               temperature: float = 1.0, top_p: float = 1.0) -> logit_pb2.DraftItem:
    sampling = tensor_pb2.SamplingParams(temperature=temperature, top_p=top_p)
    return logit_pb2.DraftItem(session_id=session_id, start=start, tokens=tokens, k=k, sampling=sampling, seed=seed)


def split_rows(logits: torch.Tensor, results) -> list[torch.Tensor | None]:
    """Each item's rows of the concatenated block (None for a failed item), checking they add up."""
    out, at = [], 0
    for r in results:
        if r.code != OK:
            assert r.rows == 0
            out.append(None)
            continue
        out.append(logits[at:at + r.rows])
        at += r.rows
    assert at == logits.shape[0]
    return out


def log_softmax(rows: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(rows.float(), dim=-1)


def test_score_batch_returns_per_item_results_and_one_block_of_raw_logits(batch_stub, reference_logprobs):
    a, b, c = new_session(), new_session(), new_session()
    resp = batch_stub.ScoreBatch(logit_pb2.ScoreBatchRequest(items=[
        score_item(a, 0, TOKENS, len(TOKENS)),
        score_item(new_session(), 3, [1], 1),  # unknown session
        score_item(b, 0, TOKENS[:4], 2),
        score_item(c, 0, [1, VOCAB, 2], 1),  # token out of range
        score_item(new_session(), 0, TOKENS[:3], 0),  # fills the cache, no rows
    ]), timeout=30)
    assert [r.code for r in resp.results] == [
        OK, grpc.StatusCode.NOT_FOUND.value[0], OK, grpc.StatusCode.INVALID_ARGUMENT.value[0], OK]
    assert "start=0" in resp.results[1].message and resp.results[0].message == ""
    assert [r.rows for r in resp.results] == [len(TOKENS), 0, 2, 0, 0]
    assert [r.cache_length for r in resp.results] == [len(TOKENS), 0, 4, 0, 3]
    assert resp.logits.dtype == tensor_pb2.DTYPE_FLOAT32  # the model's own dtype
    assert list(resp.logits.shape) == [len(TOKENS) + 2, VOCAB]
    logits = from_pb(resp.logits)
    assert logits.dtype == torch.float32 and logits.shape == (len(TOKENS) + 2, VOCAB)
    rows = split_rows(logits, resp.results)
    # raw logits, not log-probs: their log-softmax is the model's distribution
    assert not torch.allclose(rows[0].exp().sum(-1), torch.ones(len(TOKENS)), atol=1e-3)
    torch.testing.assert_close(log_softmax(rows[0]), reference_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(log_softmax(rows[2]), reference_logprobs[2:4], atol=1e-5, rtol=0)


def test_score_batch_steps_equal_the_single_score_rpc(batch_stub, stub):
    # three sessions stepped together, one of them through a 3-token verify, against Score alone
    seqs = {new_session(): TOKENS[:2], new_session(): TOKENS[:5], new_session(): TOKENS[:7]}
    steps = [[1], [2], [3, 4, 5], [6]]
    starts = {sid: 0 for sid in seqs}
    sends = dict(seqs)
    for step in steps:
        ids = list(seqs)
        resp = batch_stub.ScoreBatch(logit_pb2.ScoreBatchRequest(
            items=[score_item(sid, starts[sid], sends[sid], len(sends[sid])) for sid in ids]), timeout=30)
        rows = split_rows(from_pb(resp.logits), resp.results)
        for sid, r, got in zip(ids, resp.results, rows):
            full = seqs[sid]
            assert r.code == OK and r.cache_length == len(full)
            single = from_pb(score(stub, new_session(), 0, full, len(sends[sid])).logprobs)
            torch.testing.assert_close(log_softmax(got), single, atol=1e-5, rtol=0)
            starts[sid], sends[sid] = len(full), step
            seqs[sid] = full + step
    for sid in seqs:
        batch_stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=10)


def test_draft_batch_equals_the_single_draft_rpc_per_item(batch_stub, stub):
    items = [draft_item(new_session(), 0, TOKENS[:5], 2, seed=11),
             draft_item(new_session(), 2, [1], 1, seed=5),  # unknown session
             draft_item(new_session(), 0, TOKENS[:3], 3, seed=0, temperature=0.0),
             draft_item(new_session(), 0, TOKENS[:4], 4, seed=12, top_p=0.8)]
    resp = batch_stub.DraftBatch(logit_pb2.DraftBatchRequest(items=items), timeout=30)
    assert [r.code for r in resp.results] == [OK, grpc.StatusCode.NOT_FOUND.value[0], OK, OK]
    assert [len(r.drafts) for r in resp.results] == [2, 0, 3, 4]
    assert [r.rows for r in resp.results] == [3, 0, 4, 5]
    assert [r.cache_length for r in resp.results] == [7, 0, 6, 8]
    assert list(resp.logits.shape) == [12, VOCAB] and resp.logits.dtype == tensor_pb2.DTYPE_FLOAT32
    rows = split_rows(from_pb(resp.logits), resp.results)
    for it, r, got in zip(items, resp.results, rows):
        if r.code != OK:
            continue
        one = stub.Draft(logit_pb2.DraftRequest(session_id=new_session(), start=0, tokens=it.tokens, k=it.k,
                                                sampling=it.sampling, seed=it.seed), timeout=30)
        assert list(r.drafts) == list(one.tokens)
        torch.testing.assert_close(log_softmax(got), from_pb(one.logprobs), atol=1e-5, rtol=0)
        if it.sampling.temperature == 0:
            assert list(r.draft_probs) == [] and list(r.draft_cut_z) == [] and list(r.draft_cut_mass) == []
        else:  # each draft's q(x) travels as a double: what token_probs gives from the rows on the wire
            cfg = SamplingConfig(it.sampling.temperature, it.sampling.top_k, it.sampling.top_p)
            want = token_probs(got[:-1], torch.tensor(list(r.drafts)), cfg)[0]
            assert len(r.draft_probs) == it.k
            torch.testing.assert_close(torch.tensor(list(r.draft_probs), dtype=torch.float64), want, rtol=1e-5, atol=0)
            # with top-p, the cut of each draft's row: what the compiled cut gives from the rows on the wire
            cuts = [fusedrows.nucleus_cut(row.numpy(), np.float32(row.max()), np.float32(LOG2E / cfg.temperature), cfg.top_p,
                                          fusedrows._Scratch(VOCAB)) for row in got[:-1]] if cfg.top_p < 1 else []
            assert list(zip(r.draft_cut_z, r.draft_cut_mass)) == cuts and (cfg.top_p == 1) == (cuts == [])


def test_a_malformed_draft_item_fails_alone(batch_stub):
    good = new_session()
    resp = batch_stub.DraftBatch(logit_pb2.DraftBatchRequest(items=[
        draft_item(new_session(), 0, TOKENS[:3], 2, seed=1, top_p=2.0),  # top_p outside (0, 1]
        draft_item(new_session(), 0, TOKENS[:3], 0, seed=1),  # k = 0
        draft_item(good, 0, TOKENS[:3], 2, seed=1),
    ]), timeout=30)
    assert [r.code for r in resp.results] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2 + [OK]
    assert "top_p" in resp.results[0].message and "k must be" in resp.results[1].message
    assert resp.results[2].cache_length == 5 and list(resp.logits.shape) == [3, VOCAB]


def test_score_batch_past_the_kv_pool_is_resource_exhausted_for_the_items_that_do_not_fit(batch_stub, stub):
    ids = [new_session() for _ in range(3)]  # three sessions of 32 tokens: 12 blocks, the pool has 8
    seq = [7] * MAX_CONTEXT
    resp = batch_stub.ScoreBatch(logit_pb2.ScoreBatchRequest(items=[score_item(s, 0, seq, 1) for s in ids]),
                                 timeout=30)
    assert [r.code for r in resp.results] == [OK, OK, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert "KV cache" in resp.results[2].message
    want = from_pb(score(stub, new_session(), 0, seq, 1).logprobs)
    for got in split_rows(from_pb(resp.logits), resp.results)[:2]:
        torch.testing.assert_close(log_softmax(got), want, atol=1e-5, rtol=0)
    for s in ids:
        batch_stub.Release(logit_pb2.ReleaseRequest(session_id=s), timeout=10)


def test_an_empty_batch_is_answered_with_no_results(batch_stub):
    assert len(batch_stub.ScoreBatch(logit_pb2.ScoreBatchRequest(), timeout=10).results) == 0
    assert len(batch_stub.DraftBatch(logit_pb2.DraftBatchRequest(), timeout=10).results) == 0


def test_a_batch_whose_items_all_fail_still_returns_a_0_by_vocab_block(batch_stub):
    resp = batch_stub.ScoreBatch(logit_pb2.ScoreBatchRequest(items=[score_item(new_session(), 3, [1], 1)]),
                                 timeout=10)
    assert resp.results[0].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert from_pb(resp.logits).shape == (0, VOCAB)



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
    assert {m.name for m in svc.methods} == {"Info", "Score", "Draft", "Release", "ScoreBatch", "DraftBatch"}
    assert svc.FindMethodByName("ScoreBatch").output_type.full_name == "eftmesh.v1.ScoreBatchResponse"
    assert svc.FindMethodByName("DraftBatch").input_type.full_name == "eftmesh.v1.DraftBatchRequest"
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
