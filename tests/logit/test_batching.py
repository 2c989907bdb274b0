"""The batched engine over the paged KV cache, on tiny random models made here (GPT-2, and a
Llama with grouped-query attention): every item of a batch, at its own position, gets what a
plain full forward of its sequence gives; rollback, drafting, bad items and the KV budget are
per item, and never disturb the other items of the batch."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from tiny_models import tiny_models
from eftmesh.core.sampling import SamplingConfig, token_probs
from eftmesh.common import rowswire, tensors
from eftmesh.logit import convert
from eftmesh.logit.engine import DraftItem, ItemResult, ModelEngine, ScoreItem
from eftmesh.v1 import logit_pb2

ATOL = 1e-4  # batched (padded, paged) rows against a plain forward
SAME = 1e-5  # batched against the same item alone
N_POSITIONS = 64
SAMPLED = SamplingConfig(temperature=1.0)
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, torch.nn.Module]:
    return tiny_models(len(tokenizer), N_POSITIONS, seed=0)


@pytest.fixture(params=["gpt2", "llama"])
def model(request, models):
    return models[request.param]


def engine_for(model, tokenizer, **kwargs) -> ModelEngine:
    # session_active_s=0: every session not in the call counts as idle (evictable); the
    # in-flight protection has its own test
    kwargs = {"kv_cache_tokens": 1024, "kv_block_size": 8, "session_active_s": 0.0, **kwargs}
    return ModelEngine(model, tokenizer, model_id="test", role="test", **kwargs)


def seq(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def full_logprobs(model, tokens: Sequence[int]) -> torch.Tensor:
    """[len(tokens), vocab] log-probs of one plain forward, no eftmesh code involved."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(tokens)])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def logprobs(rows: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(rows.float(), dim=-1)


def assert_exact(result: ItemResult, model, tokens: Sequence[int], rows: int) -> None:
    """The item succeeded, holds all of `tokens`, and its rows are the last `rows` of a full forward."""
    assert result.error is None, result.error
    assert result.cache_length == len(tokens)
    assert result.rows.shape == (rows, model.config.vocab_size)
    assert result.rows.dtype == next(model.parameters()).dtype
    if rows:
        want = full_logprobs(model, tokens)[len(tokens) - rows:]
        assert (logprobs(result.rows) - want).abs().max().item() <= ATOL


def code(result: ItemResult) -> grpc.StatusCode:
    assert result.error is not None, "the item was expected to fail"
    return result.error.code


def release_all(engine: ModelEngine, session_ids) -> None:
    for sid in session_ids:
        engine.release(sid)
    assert len(engine.sessions) == 0
    assert engine.pool.free_blocks == engine.pool.num_blocks  # every block came back


# --- score_batch: exactness -----------------------------------------------------------------------


def test_score_batch_at_different_lengths_steps_and_verifies_equals_a_full_forward(model, tokenizer):
    vocab = len(tokenizer)
    engine = engine_for(model, tokenizer, max_batch=3)  # five sessions: short items in groups of 3 and 2
    # prefixes of 1 to 40 tokens; 40 is past the short-item limit, so it runs as a prefill of its own
    prefix = {"a": 1, "b": 6, "c": 13, "d": 40, "e": 3}
    want_rows = {"a": 1, "b": 6, "c": 2, "d": 40, "e": 0}
    seqs = {sid: seq(i, n, vocab) for i, (sid, n) in enumerate(prefix.items())}
    results = engine.score_batch([ScoreItem(sid, 0, s, want_rows[sid]) for sid, s in seqs.items()])
    for (sid, s), r in zip(seqs.items(), results):
        assert_exact(r, model, s, want_rows[sid])

    # steps of one token each, several rounds: the caches each batch wrote must stay right
    for step in range(3):
        new = {sid: seq(100 + 10 * step + i, 1, vocab) for i, sid in enumerate(seqs)}
        results = engine.score_batch([ScoreItem(sid, len(s), new[sid], 1) for sid, s in seqs.items()])
        for (sid, s), r in zip(seqs.items(), results):
            s.extend(new[sid])
            assert_exact(r, model, s, 1)

    # verify-sized items of different lengths (and rows) in one batch, then a plain step again
    verify = {"a": (2, 2), "b": (5, 5), "c": (3, 1), "d": (1, 1), "e": (4, 4)}  # sid: (tokens, rows)
    new = {sid: seq(200 + i, verify[sid][0], vocab) for i, sid in enumerate(seqs)}
    results = engine.score_batch([ScoreItem(sid, len(s), new[sid], verify[sid][1]) for sid, s in seqs.items()])
    for (sid, s), r in zip(seqs.items(), results):
        s.extend(new[sid])
        assert_exact(r, model, s, verify[sid][1])
    results = engine.score_batch([ScoreItem(sid, len(s), [7], 1) for sid, s in seqs.items()])
    for s, r in zip(seqs.values(), results):
        s.append(7)
        assert_exact(r, model, s, 1)
    release_all(engine, seqs)


def test_short_items_share_forwards_up_to_max_batch_and_prefills_run_apart(models, tokenizer):
    engine = engine_for(models["gpt2"], tokenizer, max_batch=3)
    sizes: list[int] = []
    forward = engine._forward

    def recording_forward(rows, results):
        sizes.append(len(rows))
        return forward(rows, results)

    engine._forward = recording_forward
    lengths = [2, 5, 34, 3, 9, 40]  # 34 and 40 are prefills
    engine.score_batch([ScoreItem(str(i), 0, seq(i, n, len(tokenizer)), 1) for i, n in enumerate(lengths)])
    assert sizes == [3, 1, 2]  # four short items in groups of 3 and 1, then both prefills together
    sizes.clear()
    engine.score_batch([ScoreItem(str(i), n, [5], 1) for i, n in enumerate(lengths)])
    assert sizes == [3, 3]  # six decode steps, max_batch at a time


def test_single_session_score_and_draft_are_a_batch_of_one_in_log_softmax_float32(model, tokenizer):
    engine = engine_for(model, tokenizer)
    s = seq(3, 9, len(tokenizer))
    lp, length = engine.score("one", 0, s, 4)
    assert length == 9 and lp.dtype == torch.float32 and lp.shape == (4, len(tokenizer))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4))
    assert (lp - full_logprobs(model, s)[-4:]).abs().max().item() <= ATOL
    drafts, rows, length = engine.draft("one", 9, [11], 3, GREEDY, seed=0)
    assert length == 13 and len(drafts) == 3 and rows.dtype == torch.float32
    full = full_logprobs(model, s + [11] + drafts)
    assert (rows - full[-4:]).abs().max().item() <= ATOL
    assert drafts == [int(r.argmax()) for r in rows[:3]]


# --- rollback inside a batch ------------------------------------------------------------------------


def test_rollback_inside_a_batch_is_exact_per_item(model, tokenizer):
    vocab = len(tokenizer)
    engine = engine_for(model, tokenizer)
    cached = {"a": seq(1, 10, vocab), "b": seq(2, 6, vocab), "c": seq(3, 8, vocab), "d": seq(4, 12, vocab),
              "e": seq(5, 17, vocab)}
    for r in engine.score_batch([ScoreItem(sid, 0, s, 1) for sid, s in cached.items()]):
        assert r.error is None
    # each item cuts its own session back by a different amount (c does not: a plain append)
    plan = {"a": (7, seq(11, 3, vocab)), "b": (2, seq(12, 1, vocab)), "c": (8, seq(13, 2, vocab)),
            "d": (0, seq(14, 5, vocab)), "e": (9, seq(15, 4, vocab))}
    results = engine.score_batch([ScoreItem(sid, start, new, len(new)) for sid, (start, new) in plan.items()])
    seqs = {}
    for (sid, (start, new)), r in zip(plan.items(), results):
        seqs[sid] = cached[sid][:start] + new
        assert_exact(r, model, seqs[sid], len(new))
    # rolled-back sessions hold only the blocks their new lengths need
    assert engine.pool.used_blocks == sum(engine.pool.blocks_for(len(s)) for s in seqs.values())
    # the stale slots past each new end never leak into later steps
    for step in range(2):
        results = engine.score_batch([ScoreItem(sid, len(s), [40 + step], 1) for sid, s in seqs.items()])
        for s, r in zip(seqs.values(), results):
            s.append(40 + step)
            assert_exact(r, model, s, 1)
    release_all(engine, seqs)


# --- draft_batch ------------------------------------------------------------------------------------


def draft_items(vocab: int) -> list[DraftItem]:
    return [
        DraftItem("a", 0, seq(21, 5, vocab), 1, SAMPLED, seed=1),
        DraftItem("b", 0, seq(22, 9, vocab), 3, GREEDY, seed=0),
        DraftItem("c", 0, seq(23, 40, vocab), 5, SAMPLED, seed=7, vocab_limit=100),  # a prefill first
        DraftItem("d", 4, seq(24, 2, vocab), 4, SamplingConfig(temperature=0.8, top_p=0.9), seed=3),  # rollback
        DraftItem("e", 3, seq(25, 1, vocab), 2, GREEDY, seed=0, vocab_limit=200),
        DraftItem("f", 0, seq(26, 7, vocab), 3, SAMPLED, seed=11),  # draws beside a, from stacked rows
    ]


def prepare_draft_sessions(engine: ModelEngine, vocab: int) -> dict[str, list[int]]:
    """Sessions d and e hold a cached prefix that their draft items start inside or at the end of."""
    held = {"d": seq(30, 6, vocab), "e": seq(31, 3, vocab)}
    for r in engine.score_batch([ScoreItem(sid, 0, s, 1) for sid, s in held.items()]):
        assert r.error is None
    return held


def test_a_draft_answer_copies_each_forward_s_rows_without_joining_them(models, tokenizer):
    """A drafted item keeps its k + 1 rows as its k + 1 forwards gave them (ItemResult.pieces);
    the answer copies each piece into the bytes it sends, which parse to the joined rows, and
    joins nothing itself. Reading `rows` joins them, once."""
    vocab = len(tokenizer)
    engine = engine_for(models["llama"], tokenizer)
    items = [DraftItem("a", 0, seq(1, 5, vocab), 3, GREEDY, seed=0), DraftItem("b", 0, seq(2, 4, vocab), 2, SAMPLED, seed=1)]
    results = engine.draft_batch(items)
    assert [len(r.pieces) for r in results] == [4, 3] and all(r.error is None for r in results)
    pieces = [list(r.pieces) for r in results]
    reply = convert.results_to_reply(results, vocab, engine.dtype, logit_pb2.DraftBatchResponse(floored=True))
    assert [len(r.pieces) for r in results] == [4, 3]  # answering joined nothing
    msg = logit_pb2.DraftBatchResponse.FromString(rowswire.serialize(reply))  # protobuf's own parse
    assert [r.rows for r in msg.results] == [4, 3]
    assert torch.equal(tensors.from_pb(msg.logits), torch.cat([torch.cat(p) for p in pieces]))
    joined = results[0].rows
    assert torch.equal(joined, torch.cat(pieces[0])) and results[0].pieces == [joined] and results[0].rows is joined


def test_draft_batch_equals_each_item_alone_and_a_full_forward(model, tokenizer):
    vocab = len(tokenizer)
    items = draft_items(vocab)
    batched, alone = engine_for(model, tokenizer), engine_for(model, tokenizer)
    held = prepare_draft_sessions(batched, vocab)
    prepare_draft_sessions(alone, vocab)
    results = batched.draft_batch(items)
    singles = [alone.draft_batch([it])[0] for it in items]
    seqs = {}
    for it, r, one in zip(items, results, singles):
        assert r.error is None and one.error is None, (r.error, one.error)
        assert len(r.drafts) == it.k
        assert r.drafts == one.drafts
        assert r.rows.shape == (it.k + 1, vocab)
        assert (r.rows.float() - one.rows.float()).abs().max().item() <= SAME
        assert r.cache_length == one.cache_length == it.start + len(it.tokens) + it.k
        if it.vocab_limit:
            assert all(0 <= x < it.vocab_limit for x in r.drafts)
        limit = it.vocab_limit or vocab
        if it.sampling.greedy:
            assert r.drafts == [int(row[:limit].argmax()) for row in r.rows[:-1]] and r.draft_probs == []
        else:  # each draft's q(x), what verification computes from the rows returned (up to
            # float rounding: torch takes the exp of a buffer's last entries another way, and a
            # token at the top-p boundary may fall either side in another batch)
            want = token_probs(r.rows[:-1, :limit].float(), torch.tensor(r.drafts), it.sampling)[0]
            torch.testing.assert_close(torch.tensor(r.draft_probs, dtype=torch.float64), want, rtol=1e-5, atol=0)
            torch.testing.assert_close(torch.tensor(one.draft_probs, dtype=torch.float64), want, rtol=1e-5, atol=0)
            assert len(r.draft_probs) == it.k and bool(((want > 0) & (want <= 1)).all())
        s = held.get(it.session_id, [])[: it.start] + list(it.tokens) + r.drafts
        full = full_logprobs(model, s)[-(it.k + 1):]  # each draft's row and the bonus row
        assert (logprobs(r.rows) - full).abs().max().item() <= ATOL
        seqs[it.session_id] = s
    assert len({tuple(r.drafts) for r in results if len(r.drafts) > 1}) > 1  # the items drafted differently
    # the caches hold every draft: the next step of each session goes on exactly
    results = batched.score_batch([ScoreItem(sid, len(s), [9], 1) for sid, s in seqs.items()])
    for s, r in zip(seqs.values(), results):
        assert_exact(r, model, s + [9], 1)


def test_seeded_draft_batch_is_reproducible_and_accepts_a_partial_rollback(models, tokenizer):
    vocab = len(tokenizer)
    model = models["gpt2"]
    engine = engine_for(model, tokenizer)
    first = engine.draft_batch([DraftItem("x", 0, seq(40, 6, vocab), 4, SAMPLED, seed=99),
                                DraftItem("y", 0, seq(41, 3, vocab), 2, SAMPLED, seed=98)])
    again = engine.draft_batch([DraftItem("x2", 0, seq(40, 6, vocab), 4, SAMPLED, seed=99)])
    assert again[0].drafts == first[0].drafts
    # speculation keeps two of x's drafts, rejects the rest, and drafts again from there
    kept = seq(40, 6, vocab) + first[0].drafts[:2]
    nxt = engine.draft_batch([DraftItem("x", 8, [17], 3, SAMPLED, seed=5),
                              DraftItem("y", 5, [18], 1, GREEDY, seed=0)])
    assert nxt[0].cache_length == 12 and nxt[1].cache_length == 7
    full = full_logprobs(model, kept + [17] + nxt[0].drafts)[-4:]
    assert (logprobs(nxt[0].rows) - full).abs().max().item() <= ATOL


# --- a bad item fails alone -------------------------------------------------------------------------


def test_a_bad_score_item_fails_only_itself(models, tokenizer):
    vocab = len(tokenizer)
    model = models["gpt2"]
    engine = engine_for(model, tokenizer, max_context=32)
    held = {"a": seq(50, 5, vocab), "b": seq(51, 4, vocab), "c": seq(52, 6, vocab)}
    engine.score_batch([ScoreItem(sid, 0, s, 1) for sid, s in held.items()])
    fresh, late = seq(53, 5, vocab), seq(54, 3, vocab)
    items = [
        ScoreItem("a", 5, [8], 1),  # ok
        ScoreItem("ghost", 3, [1], 1),  # unknown session, start > 0
        ScoreItem("b", 7, [1], 1),  # a gap: b holds 4
        ScoreItem("c", 6, [1, vocab, 2], 1),  # token out of range
        ScoreItem("n", 0, fresh, 5),  # ok, new
        ScoreItem("a", 6, [9], 1),  # a again in the same batch
        ScoreItem("long", 0, [3] * 33, 1),  # over max_context 32
        ScoreItem("m", 0, late, 2),  # ok, new
        ScoreItem("rows", 0, [1, 2], 3),  # more rows than tokens
        ScoreItem("", 0, [1], 1),  # no session id
        ScoreItem("empty", 0, [], 0),  # no tokens
        ScoreItem("neg", 0, [4, -1], 1),  # negative token
    ]
    r = engine.score_batch(items)
    assert code(r[1]) == grpc.StatusCode.NOT_FOUND
    assert code(r[2]) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(r[3]) == grpc.StatusCode.INVALID_ARGUMENT and str(vocab) in str(r[3].error)
    assert code(r[5]) == grpc.StatusCode.INVALID_ARGUMENT and "twice" in str(r[5].error)
    assert code(r[6]) == grpc.StatusCode.OUT_OF_RANGE
    assert [code(x) for x in r[8:]] == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    assert all(x.rows is None and x.drafts == [] for i, x in enumerate(r) if i not in (0, 4, 7))
    held["a"].append(8)
    assert_exact(r[0], model, held["a"], 1)  # the first item of a, not the duplicate
    assert_exact(r[4], model, fresh, 5)
    assert_exact(r[7], model, late, 2)
    # failed items left their sessions as they were, and created none
    r = engine.score_batch([ScoreItem("b", 4, [6], 1), ScoreItem("c", 6, [6], 1), ScoreItem("long", 1, [6], 1)])
    assert_exact(r[0], model, held["b"] + [6], 1)
    assert_exact(r[1], model, held["c"] + [6], 1)
    assert code(r[2]) == grpc.StatusCode.NOT_FOUND
    release_all(engine, ["a", "b", "c", "n", "m"])


def test_a_bad_draft_item_fails_only_itself(models, tokenizer):
    vocab = len(tokenizer)
    model = models["gpt2"]
    batched = engine_for(model, tokenizer, max_context=32, max_k=4)
    alone = engine_for(model, tokenizer, max_context=32, max_k=4)
    good = [DraftItem("g1", 0, seq(60, 4, vocab), 2, SAMPLED, seed=1),
            DraftItem("g2", 0, seq(61, 7, vocab), 4, GREEDY, seed=0)]
    items = [
        good[0],
        DraftItem("k0", 0, [1, 2], 0, SAMPLED, seed=1),  # k below 1
        DraftItem("k5", 0, [1, 2], 5, SAMPLED, seed=1),  # k above max_k
        DraftItem("ghost", 2, [1], 2, SAMPLED, seed=1),  # unknown session
        DraftItem("lim", 0, [1, 2], 2, SAMPLED, seed=1, vocab_limit=vocab + 1),  # limit past the vocabulary
        DraftItem("ctx", 0, [3] * 30, 3, SAMPLED, seed=1),  # 30 + 3 drafts past max_context 32
        DraftItem("tok", 0, [vocab], 1, SAMPLED, seed=1),  # token out of range
        good[1],
    ]
    r = batched.draft_batch(items)
    assert [code(x) for x in r[1:7]] == [
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT,
    ]
    for it, got in zip(good, (r[0], r[7])):
        one = alone.draft_batch([it])[0]
        assert got.error is None
        assert got.drafts == one.drafts and got.cache_length == it.start + len(it.tokens) + it.k
        assert (got.rows.float() - one.rows.float()).abs().max().item() <= SAME
    assert len(batched.sessions) == 2  # the failed items created no session


# --- the KV budget ----------------------------------------------------------------------------------


def test_a_session_in_flight_is_never_evicted_for_room(models, tokenizer):
    """A session used within session_active_s belongs to a generation in flight that merely sat
    out this call (a prefill-only step, another combiner's batch): the newcomer that needs its
    room gets RESOURCE_EXHAUSTED instead; once the session has been idle longer, it is evicted."""
    vocab = len(tokenizer)
    model = models["gpt2"]
    engine = engine_for(model, tokenizer, kv_cache_tokens=32, kv_block_size=8, session_active_s=1.0)  # 4 blocks
    running = seq(60, 20, vocab)  # 3 blocks
    assert engine.score("running", 0, running, 1)[1] == 20
    newcomer = seq(61, 12, vocab)  # 2 blocks: only 1 is free
    assert code(engine.score_batch([ScoreItem("new", 0, newcomer, 1)])[0]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert engine.sessions.evictions == 0
    r = engine.score_batch([ScoreItem("running", 20, [3], 1)])[0]  # untouched: still exact
    assert_exact(r, model, running + [3], 1)
    time.sleep(1.05)  # now idle for longer than the window (1 s: a loaded machine takes a while between calls)
    assert_exact(engine.score_batch([ScoreItem("new", 0, newcomer, 1)])[0], model, newcomer, 1)
    assert engine.sessions.evictions == 1
    release_all(engine, ["new"])


def test_a_new_session_at_the_kv_budget_evicts_the_least_recently_used_idle_one(models, tokenizer):
    vocab = len(tokenizer)
    model = models["gpt2"]
    engine = engine_for(model, tokenizer, kv_cache_tokens=64, kv_block_size=8)  # 8 blocks
    assert engine.pool.num_blocks == 8 and engine.info.kv_cache_tokens == 64
    seqs = {f"s{i}": seq(70 + i, 15, vocab) for i in range(4)}  # 2 blocks each: the pool is full
    for sid, s in seqs.items():
        assert engine.score(sid, 0, s, 1)[1] == 15
    assert engine.pool.free_blocks == 0 and engine.kv_tokens_used == 64
    r = engine.score_batch([ScoreItem("s0", 15, [4], 1)])[0]  # 16 tokens: still 2 blocks; s0 is now fresh
    seqs["s0"].append(4)
    assert_exact(r, model, seqs["s0"], 1)
    assert engine.sessions.evictions == 0
    newcomer = seq(79, 10, vocab)
    assert_exact(engine.score_batch([ScoreItem("new", 0, newcomer, 1)])[0], model, newcomer, 1)
    assert engine.sessions.evictions == 1  # s1, the least recently used, made room
    assert code(engine.score_batch([ScoreItem("s1", 15, [4], 1)])[0]) == grpc.StatusCode.NOT_FOUND
    results = engine.score_batch([ScoreItem(sid, 15 if sid != "s0" else 16, [5], 1) for sid in ("s0", "s2", "s3")])
    for sid, r in zip(("s0", "s2", "s3"), results):
        assert_exact(r, model, seqs[sid] + [5], 1)
    release_all(engine, ["s0", "s2", "s3", "new"])


def test_a_batch_larger_than_the_pool_fails_only_the_items_that_do_not_fit(models, tokenizer):
    vocab = len(tokenizer)
    model = models["gpt2"]
    engine = engine_for(model, tokenizer, kv_cache_tokens=64, kv_block_size=8)  # 8 blocks
    y = seq(80, 8, vocab)
    assert engine.score("y", 0, y, 1)[1] == 8  # 1 block, in this batch below
    a, b, c = seq(81, 20, vocab), seq(82, 20, vocab), seq(83, 20, vocab)  # 3 blocks each
    r = engine.score_batch([ScoreItem("a", 0, a, 2), ScoreItem("y", 8, [6], 1),
                            ScoreItem("b", 0, b, 1), ScoreItem("c", 0, c, 1)])
    assert_exact(r[0], model, a, 2)
    assert_exact(r[1], model, y + [6], 1)
    assert_exact(r[2], model, b, 1)
    assert code(r[3]) == grpc.StatusCode.RESOURCE_EXHAUSTED and r[3].rows is None
    assert engine.pool.free_blocks == 0 and engine.sessions.evictions == 0  # nothing outside the batch to evict
    # c got no cache; the survivors go on exactly
    assert code(engine.score_batch([ScoreItem("c", 20, [1], 1)])[0]) == grpc.StatusCode.NOT_FOUND
    y.append(6)
    # y wants 3 blocks now, a and b hold the rest: y fails and keeps its 9 tokens, a and b go on
    r = engine.score_batch([ScoreItem("a", 20, [7], 1), ScoreItem("y", 9, seq(84, 10, vocab), 1),
                            ScoreItem("b", 20, [8, 9], 2)])
    assert_exact(r[0], model, a + [7], 1)
    assert code(r[1]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_exact(r[2], model, b + [8, 9], 2)
    r = engine.score_batch([ScoreItem("y", 9, [3], 1), ScoreItem("a", 21, [2], 1)])
    assert_exact(r[0], model, y + [3], 1)
    assert_exact(r[1], model, a + [7, 2], 1)
    release_all(engine, ["a", "b", "y"])
    # with the pool free again, c's full prefix fits
    assert_exact(engine.score_batch([ScoreItem("c", 0, c, 1)])[0], model, c, 1)


def test_a_draft_batch_larger_than_the_pool_fails_only_the_items_that_do_not_fit(models, tokenizer):
    vocab = len(tokenizer)
    model = models["gpt2"]
    batched = engine_for(model, tokenizer, kv_cache_tokens=32, kv_block_size=8)  # 4 blocks
    alone = engine_for(model, tokenizer)
    items = [DraftItem("a", 0, seq(90, 10, vocab), 4, SAMPLED, seed=1),  # 14 tokens: 2 blocks
             DraftItem("b", 0, seq(91, 13, vocab), 4, SAMPLED, seed=2),  # 17 tokens: 3 blocks
             DraftItem("c", 0, seq(92, 3, vocab), 3, GREEDY, seed=0)]  # 6 tokens: 1 block
    r = batched.draft_batch(items)
    assert code(r[1]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for i in (0, 2):
        one = alone.draft_batch([items[i]])[0]
        assert r[i].error is None and r[i].drafts == one.drafts
        assert (r[i].rows.float() - one.rows.float()).abs().max().item() <= SAME
    release_all(batched, ["a", "c"])


def test_the_session_cap_never_evicts_a_session_of_the_same_batch(models, tokenizer):
    vocab = len(tokenizer)
    model = models["gpt2"]
    engine = engine_for(model, tokenizer, max_sessions=2)
    a, b = seq(95, 5, vocab), seq(96, 5, vocab)
    engine.score_batch([ScoreItem("a", 0, a, 1), ScoreItem("b", 0, b, 1)])
    r = engine.score_batch([ScoreItem("a", 5, [3], 1), ScoreItem("b", 5, [4], 1), ScoreItem("c", 0, [5, 6], 1)])
    assert_exact(r[0], model, a + [3], 1)
    assert_exact(r[1], model, b + [4], 1)
    if r[2].error is not None:
        assert code(r[2]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for sid in ("a", "b", "c"):
        engine.release(sid)
    assert engine.pool.free_blocks == engine.pool.num_blocks  # no block left behind by a dropped session


# --- bytes per cached token ---------------------------------------------------------------------------


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, config.hidden_size // heads


def test_kv_bytes_per_token_are_close_to_theoretical_after_warmup(model, tokenizer):
    engine = engine_for(model, tokenizer, kv_cache_tokens=256, kv_block_size=16)
    assert engine.pool.bytes_per_token() == 0.0  # nothing allocated before the first forward
    engine.warmup()
    layers, kv_heads, head_dim = kv_shape(model.config)
    theoretical = 2 * layers * kv_heads * head_dim * 4  # float32
    assert (engine.pool.kv_heads, engine.pool.head_dim) == (kv_heads, head_dim)
    assert engine.pool.theoretical_bytes_per_token() == theoretical
    assert theoretical <= engine.pool.bytes_per_token() <= 1.25 * theoretical
    assert engine.pool.free_blocks == engine.pool.num_blocks and len(engine.sessions) == 0  # warmup released


def test_a_bfloat16_model_caches_and_returns_rows_in_bfloat16(models, tokenizer):
    model = GPT2LMHeadModel(models["gpt2"].config).eval()
    model.load_state_dict(models["gpt2"].state_dict())
    model = model.to(torch.bfloat16)
    engine = engine_for(model, tokenizer, kv_cache_tokens=256, kv_block_size=16)
    engine.warmup()
    layers, kv_heads, head_dim = kv_shape(model.config)
    assert engine.pool.theoretical_bytes_per_token() == 2 * layers * kv_heads * head_dim * 2
    assert engine.pool.bytes_per_token() <= 1.25 * engine.pool.theoretical_bytes_per_token()
    s = seq(97, 6, len(tokenizer))
    r = engine.score_batch([ScoreItem("bf", 0, s, 2)])[0]
    assert r.rows.dtype == torch.bfloat16 and r.rows.shape == (2, len(tokenizer))
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([s])).logits[0, -2:]
    assert (r.rows.float() - want.float()).abs().max().item() <= 0.05  # bf16 arithmetic, same model


@pytest.mark.parametrize("failure,code", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a fake)"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RuntimeError("an op the model could not run (a fake)"), grpc.StatusCode.INTERNAL),
], ids=["out-of-memory", "fault"])
def test_a_failed_forward_fails_its_rows_alone_and_an_out_of_memory_one_asks_for_a_retry(models, tokenizer, failure, code):
    """A forward that runs out of memory (a prefill's activations on a full GPU) is load, not a
    fault: its rows get RESOURCE_EXHAUSTED with what to do, which the combiner meets as it does
    a full KV cache (preempt, re-prefill later); any other failure is INTERNAL. Either way the
    rows' sessions are dropped (their caches may hold part of the forward), the other items of
    the call are served, and the next forward runs. A fake: the runner raises once."""
    engine = engine_for(models["llama"], tokenizer)
    held = seq(1, 5, 64)
    assert engine.score_batch([ScoreItem("held", 0, held, 1)])[0].error is None
    real, calls = engine.runner.forward, []

    def fails_once(batch):
        calls.append(len(batch.ids))
        if len(calls) == 1:
            raise failure
        return real(batch)

    engine.runner.forward = fails_once
    # a decode and a 40-token prefill: too unequal to share a forward; the shorter runs first
    decode, prefill = engine.score_batch([ScoreItem("held", 5, [7], 1), ScoreItem("new", 0, seq(2, 40, 64), 1)])
    assert calls == [1, 1]
    assert decode.error is not None and decode.error.code == code
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "out of device memory" in str(decode.error) and "--prefill-tokens" in str(decode.error)
    assert prefill.error is None and prefill.cache_length == 40  # the call's other item was served
    assert engine.sessions.get("held") is None  # dropped: its caller starts it again at 0
    again = engine.score_batch([ScoreItem("held", 0, held + [7], 1)])[0]
    assert again.error is None and again.cache_length == 6
