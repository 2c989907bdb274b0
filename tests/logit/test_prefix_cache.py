"""Prefix caching (logit/prefix.py over the paged pool): full blocks keyed by their prefix are
shared by reference, never written while shared (copy-on-write), kept as idle cache and evicted
least recently released first, before any session; and the engine's output with the cache
equals its output without it, over random workloads that share, fork, roll back, draft and
evict (hypothesis), with the pool's accounting back to empty at the end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tiny_models import tiny_models
from eftmesh.common.errors import NotFound, ResourceExhausted
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.engine import DraftItem, ItemResult, ModelEngine, ScoreItem
from eftmesh.logit.kvcache import BlockTable, PagedKVPool
from eftmesh.common.blocks import ROOT, block_key

CPU = torch.device("cpu")
SAME = 1e-5  # cached against uncached, float32
N_POSITIONS = 64


def pool(capacity_tokens: int = 32, block_size: int = 4) -> PagedKVPool:
    p = PagedKVPool(capacity_tokens, block_size, 2, CPU, torch.float32, prefix_cache=True)
    p.allocate(kv_heads=1, head_dim=2)
    return p


def filled(p: PagedKVPool, ids: list[int]) -> BlockTable:
    """A table that has run `ids` (what the engine does around a forward)."""
    t = BlockTable()
    p.reserve(t, len(ids))
    p.commit(t, ids)
    return t


def assert_empty(p: PagedKVPool) -> None:
    assert p.used_blocks == 0 and p.free_blocks == p.num_blocks
    assert all(p.refs(b) == 0 for b in range(p.num_blocks + 1))


# --- keys ---------------------------------------------------------------------------------------------


def test_a_block_key_names_its_whole_prefix_not_its_tokens_alone():
    a = block_key(ROOT, [1, 2, 3, 4])
    assert a == block_key(ROOT, [1, 2, 3, 4]) and len(a) == 32
    assert block_key(a, [5, 6, 7, 8]) != block_key(block_key(ROOT, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert block_key(ROOT, [1, 2, 3, 4]) != block_key(ROOT, [4, 3, 2, 1])
    assert block_key(ROOT, [2**40]) != block_key(ROOT, [0])  # ids are not truncated to 32 bits


# --- the pool with a prefix cache ---------------------------------------------------------------------


def test_only_full_blocks_are_registered_after_they_are_written():
    p = pool()
    t = filled(p, list(range(10)))  # blocks of 4: two full, one partial
    assert p.cached_blocks == 2 and len(t.keys) == 2
    p.reserve(t, 12)
    p.commit(t, [10, 11])
    assert p.cached_blocks == 3


def test_a_new_table_takes_the_matching_full_blocks_by_reference():
    p = pool()
    a = filled(p, list(range(10)))
    b = BlockTable()
    assert p.match(b, list(range(10)) + [99], most=10) == 8
    assert b.blocks == a.blocks[:2] and b.length == 8 and b.ids == list(range(8))
    assert [p.refs(x) for x in a.blocks] == [2, 2, 1]
    assert p.prefix.lookups == 1 and p.prefix.hit_tokens == 8 and p.prefix.queried_tokens == 8


def test_the_match_stops_at_the_first_block_that_differs_and_never_passes_most():
    p = pool()
    filled(p, list(range(12)))
    fork = BlockTable()
    assert p.match(fork, [0, 1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11], most=11) == 4
    capped = BlockTable()
    assert p.match(capped, list(range(12)), most=7) == 4  # the cap keeps the caller's last rows to run


def test_released_cached_blocks_stay_matchable_until_the_pool_needs_them():
    p = pool(capacity_tokens=16)  # four blocks
    a = filled(p, list(range(8)))
    p.free(a)
    assert p.free_blocks == 4 and p.used_blocks == 0 and p.cached_blocks == 2  # idle cache counts as free
    b = BlockTable()
    assert p.match(b, list(range(8)) + [1], most=8) == 8
    p.free(b)
    c = filled(p, [50 + i for i in range(16)])  # needs every block: the idle ones are evicted
    assert p.prefix.evictions == 2 and p.match(BlockTable(), list(range(9)), most=8) == 0
    p.free(c)


def test_idle_cached_blocks_are_evicted_least_recently_released_first_tail_first():
    p = pool(capacity_tokens=24)  # six blocks
    a = filled(p, list(range(8)))  # blocks 1, 2
    b = filled(p, [100 + i for i in range(8)])  # blocks 3, 4
    p.free(a)
    p.free(b)
    filled(p, [200 + i for i in range(16)])  # two free blocks, then two idle: a's, tail first
    assert p.prefix.evictions == 2
    assert p.match(BlockTable(), [100 + i for i in range(9)], most=8) == 8  # b's prefix survives
    assert p.match(BlockTable(), list(range(9)), most=8) == 0


def test_cutting_back_into_a_shared_block_copies_it_before_the_write():
    p = pool()
    a = filled(p, list(range(8)))
    for layer in p.kv:
        layer[a.blocks[1] * 4:(a.blocks[1] + 1) * 4] = 7.0  # the shared block's contents
    b = BlockTable()
    p.match(b, list(range(8)) + [0], most=8)
    p.truncate(b, 6)  # speculation rolled back into the shared second block
    assert p.blocks_needed(b, 7) == 1
    p.reserve(b, 7)
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    assert p.refs(a.blocks[1]) == 1 and a.blocks[1] in p.prefix.key_of  # the original stays cached
    for layer in p.kv:
        assert (layer[b.blocks[1] * 4:(b.blocks[1] + 1) * 4] == 7.0).all()  # the copy holds its slots
    p.free(a)
    p.free(b)
    assert_empty(p)


def test_cutting_back_into_a_cached_block_held_alone_unregisters_it():
    p = pool()
    a = filled(p, list(range(8)))
    p.truncate(a, 6)
    p.reserve(a, 7)
    assert a.blocks[1] not in p.prefix.key_of and p.cached_blocks == 1
    p.commit(a, [42])
    p.reserve(a, 8)
    p.commit(a, [43])
    assert p.cached_blocks == 2 and a.keys[1] == block_key(a.keys[0], [4, 5, 42, 43])
    p.free(a)
    assert_empty(p)


def test_turning_the_cache_off_frees_its_idle_blocks_and_forgets_it():
    p = pool()
    p.free(filled(p, list(range(8))))
    p.set_prefix_cache(False)
    assert p.cached_blocks == 0 and p.free_blocks == p.num_blocks
    p.set_prefix_cache(True)
    assert p.match(BlockTable(), list(range(9)), most=8) == 0
    assert_empty(p)


# --- the engine: the same output with and without the cache -------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, torch.nn.Module]:
    return tiny_models(len(tokenizer), N_POSITIONS, seed=1)


def engines(model, tokenizer, **kwargs) -> tuple[ModelEngine, ModelEngine]:
    kw = {"kv_cache_tokens": 1024, "kv_block_size": 4, "session_active_s": 0.0, **kwargs}
    return (ModelEngine(model, tokenizer, model_id="t", role="t", prefix_cache=True, **kw),
            ModelEngine(model, tokenizer, model_id="t", role="t", prefix_cache=False, **kw))


def assert_same(a: ItemResult, b: ItemResult) -> None:
    assert a.error is None and b.error is None, (a.error, b.error)
    assert a.cache_length == b.cache_length and a.drafts == b.drafts
    assert a.rows.shape == b.rows.shape
    assert (a.rows.float() - b.rows.float()).abs().max().item() <= SAME


def test_a_second_request_resending_a_history_runs_only_what_the_cache_lacks(models, tokenizer):
    cached, plain = engines(models["llama"], tokenizer)
    history = list(range(3, 33))  # 30 tokens: seven full blocks of 4
    first = cached.score_batch([ScoreItem("turn1", 0, history, 2)])[0]
    assert first.cached_tokens == 0
    turn2 = history + [40, 41, 42]
    ran = []
    forward = cached._forward
    cached._forward = lambda rows, results: (ran.extend(len(r.ids) for r in rows), forward(rows, results))
    second = cached.score_batch([ScoreItem("turn2", 0, turn2, 2)])[0]
    assert second.cached_tokens == 28 and ran == [5]
    assert_same(second, plain.score_batch([ScoreItem("turn2", 0, turn2, 2)])[0])


def test_an_item_that_only_fills_the_cache_may_find_all_of_it_and_then_runs_nothing(models, tokenizer):
    """rows 0 (a piece of a chunked prompt): no logit is wanted, so every cached full block of
    its tokens is taken; with all of them cached no forward runs, and the session holds them
    all, exactly as if they had run."""
    cached, plain = engines(models["llama"], tokenizer)
    piece = list(range(3, 19))  # 16 tokens: four full blocks of 4
    cached.score_batch([ScoreItem("a", 0, piece + [50, 51], 1)])
    ran = []
    forward = cached._forward
    cached._forward = lambda rows, results: (ran.extend(len(r.ids) for r in rows), forward(rows, results))
    got = cached.score_batch([ScoreItem("b", 0, piece, 0)])[0]
    assert got.error is None and got.cached_tokens == 16 and got.cache_length == 16 and ran == []
    assert got.rows.shape == (0, cached.vocab_size)
    # with rows 1 the last token runs, and one block less is taken
    assert cached.score_batch([ScoreItem("c", 0, piece, 1)])[0].cached_tokens == 12 and ran == [4]
    step = [ScoreItem("b", 16, [60], 1)]  # the next piece's (or token's) rows, as without the cache
    plain.score_batch([ScoreItem("b", 0, piece, 0)])
    assert_same(cached.score_batch(step)[0], plain.score_batch(step)[0])


def test_a_failover_resend_and_a_draft_both_take_the_cached_prefix(models, tokenizer):
    cached, plain = engines(models["gpt2"], tokenizer)
    prompt = list(range(5, 26))  # 21 tokens
    cached.score_batch([ScoreItem("a", 0, prompt, 1)])
    greedy = SamplingConfig(temperature=0.0)
    items = [DraftItem("b", 0, prompt, 3, greedy, 1)]
    got, want = cached.draft_batch(items)[0], plain.draft_batch(items)[0]
    assert got.cached_tokens == 20
    assert_same(got, want)


def test_a_draft_rolled_back_into_a_shared_block_copies_it_and_stays_exact(models, tokenizer):
    cached, plain = engines(models["llama"], tokenizer)
    prompt = list(range(7, 30))  # 23 tokens: five full blocks of 4
    for e in (cached, plain):
        e.score_batch([ScoreItem("a", 0, prompt, 1)])
    greedy = SamplingConfig(temperature=0.0)
    a = cached.draft_batch([DraftItem("b", 0, prompt, 2, greedy, 0)])[0]
    assert_same(a, plain.draft_batch([DraftItem("b", 0, prompt, 2, greedy, 0)])[0])
    copies = cached.pool.used_blocks
    # rejected drafts: "b" goes back to 18 tokens, inside the fifth block, which "a" shares
    redo = [ScoreItem("b", 18, [3, 4, 5], 3)]
    assert_same(cached.score_batch(redo)[0], plain.score_batch(redo)[0])
    assert cached.pool.used_blocks == copies  # one block copied for "b", its old tail released
    again = [ScoreItem("a", 23, [1], 1)]  # and "a", whose block it was, is untouched
    assert_same(cached.score_batch(again)[0], plain.score_batch(again)[0])
    for sid in ("a", "b"):
        cached.release(sid)
    assert cached.pool.used_blocks == 0 and cached.pool.free_blocks == cached.pool.num_blocks


class Mirror:
    """The same calls to an engine with the prefix cache and one without; a session evicted in
    either is re-sent from 0 in both (what the combiner does), so their answers stay comparable."""

    def __init__(self, model, tokenizer, **kwargs) -> None:
        self.cached, self.plain = engines(model, tokenizer, **kwargs)
        self.seqs: dict[str, list[int]] = {}
        self.hits = 0

    def score(self, sid: str, start: int, tokens: list[int], rows: int) -> None:
        full = self.seqs.get(sid, [])[:start] + tokens
        a = self.cached.score_batch([ScoreItem(sid, start, tokens, rows)])[0]
        b = self.plain.score_batch([ScoreItem(sid, start, tokens, rows)])[0]
        if isinstance(a.error, NotFound) or isinstance(b.error, NotFound):
            a = self.cached.score_batch([ScoreItem(sid, 0, full, rows)])[0]
            b = self.plain.score_batch([ScoreItem(sid, 0, full, rows)])[0]
        self._check(sid, full, a, b)

    def draft(self, sid: str, start: int, tokens: list[int], k: int, sampling: SamplingConfig, seed: int) -> None:
        full = self.seqs.get(sid, [])[:start] + tokens
        a = self.cached.draft_batch([DraftItem(sid, start, tokens, k, sampling, seed)])[0]
        b = self.plain.draft_batch([DraftItem(sid, start, tokens, k, sampling, seed)])[0]
        if isinstance(a.error, NotFound) or isinstance(b.error, NotFound):
            a = self.cached.draft_batch([DraftItem(sid, 0, full, k, sampling, seed)])[0]
            b = self.plain.draft_batch([DraftItem(sid, 0, full, k, sampling, seed)])[0]
        self._check(sid, full, a, b, a.drafts)

    def _check(self, sid: str, full: list[int], a: ItemResult, b: ItemResult, drafts: list[int] = ()) -> None:
        if isinstance(a.error, ResourceExhausted) or isinstance(b.error, ResourceExhausted):
            self.release(sid)  # a full pool refuses alike only in general; the next call starts afresh
            return
        assert_same(a, b)
        self.hits += a.cached_tokens
        self.seqs[sid] = full + list(drafts)

    def release(self, sid: str) -> None:
        self.cached.release(sid)
        self.plain.release(sid)
        self.seqs.pop(sid, None)


# One step of a workload: (kind, session, prefix choice, cut, length, seed).
STEP = st.tuples(st.sampled_from(["new", "append", "rollback", "draft", "release"]), st.integers(0, 3),
                 st.integers(0, 2), st.floats(0, 1), st.integers(1, 9), st.integers(0, 2**16))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["gpt2", "llama"]), tiny=st.booleans(), steps=st.lists(STEP, min_size=1, max_size=20))
def test_random_workloads_give_the_same_output_with_and_without_the_prefix_cache(models, tokenizer, name, tiny, steps):
    vocab = len(tokenizer)
    shared = [torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(s)).tolist() for s in (1, 2)]
    prefixes = [shared[0], shared[0][:13] + shared[1], shared[1]]  # a fork of the first after 13 tokens
    # tiny: 64 tokens of KV, so idle cached blocks and idle sessions are evicted along the way
    m = Mirror(models[name], tokenizer, kv_cache_tokens=64 if tiny else 1024)
    sampled = SamplingConfig(temperature=1.0, top_p=0.9)
    for kind, s, which, cut, n, seed in steps:
        sid = f"s{s}"
        have = m.seqs.get(sid)
        extra = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        if kind == "release":
            m.release(sid)
        elif kind == "new" or have is None:
            m.score(sid, 0, prefixes[which][:8 + int(cut * 24)] + extra, min(n, 3))
        elif kind == "append" and len(have) + n < N_POSITIONS:
            m.score(sid, len(have), extra, 1)
        elif kind == "rollback" and have:
            start = int(cut * len(have))
            m.score(sid, start, extra[: max(1, min(n, N_POSITIONS - start - 1))], 1)
        elif kind == "draft" and len(have) + 4 < N_POSITIONS:
            start = max(1, int(cut * len(have)))  # a draft after a rollback, as speculation does
            m.draft(sid, start, have[start:start + 1] if cut < 0.5 and start < len(have) else extra[:1], 3,
                    sampled if seed % 2 else SamplingConfig(temperature=0.0), seed)
    for sid in list(m.seqs):
        m.release(sid)
    for e in (m.cached, m.plain):
        assert len(e.sessions) == 0
        assert e.pool.used_blocks == 0 and e.pool.free_blocks == e.pool.num_blocks
        assert all(e.pool.refs(b) == 0 for b in range(e.pool.num_blocks + 1))
