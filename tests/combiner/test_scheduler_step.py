"""The scheduler driven step by step: `Scheduler.step()` called by the test, no scheduler
thread, no sleeps, a fake clock for back-offs and queue timeouts. The scorer is a fake that
answers synchronously from real in-process engines (tiny random models) and can refuse items."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from eftmesh.combiner.decoding import Generation, GenerationRequest, SpeculationConfig
from eftmesh.combiner.scoring import DraftCall, Outcome
from eftmesh.combiner.stream import Chunk, SpeculationStats
from eftmesh.combiner.decoder import Decoder
from conftest import collect, points
from fake_scorer import RecordingScorer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from eftmesh.combiner.scheduler import SchedulerConfig
from eftmesh.common.metrics import CombinerMetrics
from eftmesh.common.errors import Cancelled, EftMeshError, ResourceExhausted, Unavailable
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.engine import ModelEngine

BASE = Composition("base-large")
GREEDY = SamplingConfig(temperature=0.0)
SHORT = "The quick brown fox"  # 10 tokens
LONG = ["It is a truth universally acknowledged, that a single man",  # 27, 21, 24 tokens
        "In the beginning God created the heaven and the earth.", "Numbers 0 1 2 3 4 5 6 7 8 9."]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SyncScorer(RecordingScorer):
    """The recording fake, and the prompt lengths each base-large step prefilled."""

    def prefills(self) -> list[list[int]]:
        """Per ScoreBatch step of base-large: the prompt lengths prefilled (start 0)."""
        return [[len(c.tokens) for c in calls if c.start == 0] for calls in self.steps()]


@pytest.fixture(scope="module")
def engines(tiny_family: dict[str, Path]) -> dict[str, ModelEngine]:
    torch.set_num_threads(1)
    return {r: ModelEngine.from_pretrained(str(p), role=r, session_active_s=0.0) for r, p in tiny_family.items()}


@pytest.fixture(scope="module")
def tokenizer(tiny_family: dict[str, Path]) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


@pytest.fixture
def make(engines, tokenizer):
    made: list[Decoder] = []

    def build(config: SchedulerConfig = SchedulerConfig()) -> tuple[Decoder, SyncScorer, FakeClock]:
        scorer, clock = SyncScorer(engines), FakeClock()
        d = Decoder(scorer, tokenizer, len(tokenizer), config, start=False, clock=clock)
        made.append(d)
        return d, scorer, clock

    yield build
    for d in made:
        d.close()
    assert all(len(e.sessions) == 0 and e.pool.used_blocks == 0 for e in engines.values()), "a cache was left behind"


def req(prompt: str, n: int) -> GenerationRequest:
    return GenerationRequest(prompt, BASE, GREEDY, seed=0, max_new_tokens=n, ignore_eos=True, seeded=True)


def submit(d: Decoder, r: GenerationRequest) -> Generation:
    g = d.prepare(r)
    d.scheduler.submit(g)
    return g


def run_out(d: Decoder, limit: int = 500, clock: FakeClock | None = None) -> int:
    """Step until nothing is left to step; returns the steps taken. With `clock`, a step with
    nothing to do while generations wait (backing off) moves the clock on 10 ms."""
    n = 0
    while d.scheduler.step() or (clock is not None and d.scheduler.load != (0, 0)):
        if clock is not None:
            clock.now += 0.01
        n += 1
        assert n < limit, "the scheduler never ran out of work"
    return n


def chunks(g: Generation) -> list[Chunk]:
    """The generation's chunks (the test fails on an error)."""
    out = []
    while not g.out.empty():
        item = g.out.get()
        assert not isinstance(item, BaseException), item
        out.append(item)
    return out


def outcome(g: Generation) -> list[int] | BaseException:
    """The generation's tokens, or the error it ended with."""
    tokens: list[int] = []
    while not g.out.empty():
        item = g.out.get()
        if isinstance(item, BaseException):
            return item
        assert isinstance(item, Chunk)
        tokens += item.token_ids
    return tokens


def alone(make, r: GenerationRequest) -> list[int]:
    d, _, _ = make()
    g = submit(d, r)
    run_out(d)
    return outcome(g)


def test_a_consumer_of_the_whole_answer_is_woken_for_its_first_chunk_and_its_last_only(make):
    """Complete and a non-streamed HTTP request join the chunks: the scheduler hands them the
    first step's tokens (time to first token) and the rest at the end, one chunk, not one per
    step; the joined chunks are the streamed generation's."""
    d, _, _ = make()
    streamed, whole = submit(d, req(SHORT, 9)), submit(d, req(SHORT, 9))
    whole.streams = False
    assert d.scheduler.step() and d.scheduler.step()
    assert whole.out.qsize() == 1 and streamed.out.qsize() == 2  # (the second step: nothing for `whole`)
    run_out(d)
    a, b = chunks(streamed), chunks(whole)
    assert len(a) == 9 and len(b) == 2 and b[1].finish_reason is not None and b[1].usage is not None
    assert [t for c in b for t in c.token_ids] == [t for c in a for t in c.token_ids]
    assert "".join(c.text for c in b) == "".join(c.text for c in a) and len(b[0].token_ids) == 1


def test_the_scorer_is_told_to_send_its_kept_releases_when_the_batch_empties(make):
    """A finished generation's releases may wait for the next call to their replica
    (ScoreBatch's `release`); once no generation runs, none may come: the scheduler says so."""
    d, scorer, _ = make()
    short, longer = submit(d, req(SHORT, 3)), submit(d, req(SHORT, 6))
    run_out(d)
    assert outcome(short) and outcome(longer)
    assert [roles for _, roles in scorer.released] == [["base-large"], ["base-large"]]
    (first, _), (second, _) = scorer.released
    assert first < second and scorer.flushed == [second]  # not when `short` left, `longer` still running


def test_a_stream_interval_sends_the_first_token_at_once_then_every_interval_tokens(make):
    """--stream-interval 3 (vLLM's and SGLang's stream_interval): a streaming consumer gets its
    first token alone, then three at a time, and the rest with the finish; the chunks join to
    what interval 1 streams. A consumer of the whole answer still gets two."""
    d, _, _ = make(SchedulerConfig(stream_interval=3))
    spaced, whole = submit(d, req(SHORT, 11)), submit(d, req(SHORT, 11))
    whole.streams = False
    run_out(d)
    every, _, _ = make()
    each = submit(every, req(SHORT, 11))
    run_out(every)
    a, b, w = chunks(each), chunks(spaced), chunks(whole)
    assert [len(c.token_ids) for c in a] == [1] * 11
    assert [len(c.token_ids) for c in b] == [1, 3, 3, 3, 1] and b[-1].finish_reason is not None
    assert [len(c.token_ids) for c in w] == [1, 10]
    for got in (b, w):
        assert [t for c in got for t in c.token_ids] == [t for c in a for t in c.token_ids]
        assert "".join(c.text for c in got) == "".join(c.text for c in a)


def test_a_step_with_nothing_to_do_says_so(make):
    d, scorer, _ = make()
    assert d.scheduler.step() is False and scorer.calls == []


def test_one_long_prompt_joins_per_step_within_the_prefill_budget_and_prefills_run_alone(make):
    expected = [alone(make, r) for r in [req(SHORT, 12)] + [req(p, 6) for p in LONG]]
    d, scorer, _ = make(SchedulerConfig(prefill_tokens=8))
    gens = [submit(d, req(SHORT, 12))]
    assert d.scheduler.step()  # the short prompt's prefill
    gens += [submit(d, req(p, 6)) for p in LONG]
    run_out(d)
    assert [outcome(g) for g in gens] == expected
    assert scorer.prefills()[:5] == [[10], [27], [21], [24], []]
    # prefill first, never twice in a row: steps 2 and 4 run their newcomer alone
    sizes = [len(calls) for kind, role, calls in scorer.calls if kind == "score" and role == "base-large"]
    assert sizes[1:5] == [1, 3, 1, 4]


def test_without_prefill_first_a_newcomer_prefills_beside_the_running_batch_with_the_same_output(make):
    expected = [alone(make, r) for r in [req(SHORT, 12)] + [req(p, 6) for p in LONG]]
    d, scorer, _ = make(SchedulerConfig(prefill_tokens=8, prefill_first=False))
    gens = [submit(d, req(SHORT, 12))]
    assert d.scheduler.step()
    gens += [submit(d, req(p, 6)) for p in LONG]
    run_out(d)
    assert [outcome(g) for g in gens] == expected
    assert scorer.prefills()[:5] == [[10], [27], [21], [24], []]  # admitted as before, one a step
    # every newcomer joins the running batch's step: no step runs a newcomer alone
    sizes = [len(calls) for kind, role, calls in scorer.calls if kind == "score" and role == "base-large"]
    assert sizes[1:5] == [2, 3, 4, 4]


def test_a_full_kv_cache_parks_a_generation_until_its_back_off_and_its_output_is_unchanged(make):
    expected = alone(make, req(LONG[0], 8))
    d, scorer, clock = make()
    g = submit(d, req(LONG[0], 8))
    refused = []

    def full_once(role: str, call: Any) -> EftMeshError | None:
        if role == "base-large" and call.start > 0 and not refused:  # its third token: the cache is full
            refused.append(call)
            return ResourceExhausted("KV cache full (a test)")
        return None

    scorer.refuse = full_once
    reader = InMemoryMetricReader()
    d.scheduler.metrics = CombinerMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    for _ in range(3):
        d.scheduler.step()
    assert refused and d.scheduler.load == (0, 1)  # back in the queue, caches released
    (point,) = points(collect(reader), "eftmesh.generations.preempted")  # counted, with the role that refused
    assert point.value == 1 and dict(point.attributes) == {"eftmesh.role": "base-large"}
    assert g.parked == 1 and g.not_before > clock.now
    assert d.scheduler.step() is False  # backing off: nothing is admitted yet
    clock.now = g.not_before
    run_out(d)
    assert outcome(g) == expected  # the preempted step was undone and re-run: same tokens


def test_waiting_past_the_queue_timeout_fails_with_resource_exhausted(make):
    d, _, clock = make(SchedulerConfig(max_batch=1, queue_timeout_s=5.0))
    first, second = submit(d, req(SHORT, 20)), submit(d, req(SHORT, 4))
    d.scheduler.step()
    assert d.scheduler.load == (1, 1)
    clock.now += 6.0
    d.scheduler.step()
    err = outcome(second)
    assert isinstance(err, ResourceExhausted) and "--queue-timeout" in str(err) and err.reason == "queue_timeout"
    run_out(d)
    assert len(outcome(first)) == 20


def test_an_item_one_role_refuses_fails_its_generation_alone(make):
    expected = alone(make, req(LONG[1], 6))
    d, scorer, _ = make()
    doomed, fine = submit(d, req(LONG[0], 6)), submit(d, req(LONG[1], 6))
    scorer.refuse = lambda role, call: Unavailable("upstream base-large: gone") if call.session_id == \
        doomed.sessions["base-large"] else None
    run_out(d)
    assert isinstance(outcome(doomed), Unavailable)
    assert outcome(fine) == expected


def test_a_cancelled_generation_leaves_at_its_next_step_and_its_caches_are_released(make, engines):
    d, scorer, _ = make()
    g = submit(d, req(SHORT, 50))
    d.scheduler.step()
    d.scheduler.step()
    assert len(engines["base-large"].sessions) == 1
    g.cancelled = True
    d.scheduler.step()
    tokens = []
    while not g.out.empty():
        item = g.out.get()
        if isinstance(item, BaseException):
            assert isinstance(item, Cancelled)
            break
        tokens += item.token_ids
    else:
        pytest.fail("no Cancelled error delivered")
    assert len(tokens) == 2 and d.scheduler.load == (0, 0)
    assert len(engines["base-large"].sessions) == 0


def test_a_straggling_call_sets_its_generation_aside_and_the_others_step_on_with_nothing_changed(make):
    """A replica that has not answered (Outcome.pending, as GrpcScorer gives a straggler) costs
    its generation the step, undone, and nobody else anything; outputs are those of a run
    without it, sampled speculation included (the block's random draws are taken back)."""
    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    eft = Composition("base-large", (Delta("ft-small", "base-small", 1.5),))
    sampled = SamplingConfig(temperature=0.9, top_p=0.95)
    reqs = [GenerationRequest(SHORT, eft, sampled, seed=7, max_new_tokens=10, ignore_eos=True, seeded=True,
                              speculation=spec),
            req(LONG[1], 10)]
    expected = [alone(make, r) for r in reqs]
    d, scorer, _ = make()
    slow, fine = (submit(d, r) for r in reqs)
    for _ in range(3):  # both prefilled and a step in
        d.scheduler.step()
    call: Future[Any] = Future()
    held_role = {"n": 0}
    answer = scorer._batch

    def straggle(kind, role, calls, inner):
        out = answer(kind, role, calls, inner)
        if role == "base-large" and kind == "score" and held_role["n"] < 2:
            held_role["n"] += 1
            return [Outcome(pending=call) if c.session_id == slow.sessions[role] else o for c, o in zip(calls, out)]
        return out

    scorer._batch = straggle
    before = len(scorer.steps())
    d.scheduler.step()
    assert d.scheduler.load == (2, 0) and slow in d.scheduler._held and fine in d.scheduler._running
    d.scheduler.step()  # the call still runs: the other generation steps on alone
    assert [len(c) for c in scorer.steps()[before:]] == [2, 1]
    call.set_result({})  # answered (or moved): it rejoins and redoes its step
    run_out(d)
    assert [outcome(slow), outcome(fine)] == expected


def test_each_call_says_whether_the_step_has_generations_it_does_not_carry(make):
    """`partial`: a straggling replica's generations may sit the step out only where others
    can step on without them. The draft call carries only the speculating generations, and a
    role not in every composition is scored for only some; a call carrying every generation
    of the step is not partial (holding it back would only redo the same call)."""
    spec = SpeculationConfig("ft-small", 2, adaptive=False)
    eft = Composition("base-large", (Delta("ft-small", "base-small", 1.0),))
    drafting = GenerationRequest(SHORT, eft, GREEDY, seed=0, max_new_tokens=6, ignore_eos=True, seeded=True,
                                 speculation=spec)
    d, scorer, _ = make()
    submit(d, drafting)
    d.scheduler.step()
    d.scheduler.step()
    alone_calls = set(scorer.partial)
    assert ("draft", "ft-small", False) in alone_calls and not any(p for _, _, p in alone_calls)
    submit(d, dataclasses.replace(drafting, speculation=None))
    submit(d, req(LONG[0], 6))  # base-large alone: the small roles score only the other two
    scorer.partial.clear()
    d.scheduler.step()
    d.scheduler.step()
    assert set(scorer.partial) == {("draft", "ft-small", True), ("score", "base-large", False),
                                   ("score", "base-small", True), ("score", "ft-small", True)}
    run_out(d)


UPSCALE = Composition("base-large", (Delta("ft-small", "base-small", 1.0),))


def test_sampled_generations_draw_the_same_tokens_batched_as_alone(make):
    """The scheduler draws every sampled plain step of a batch in one `draw` (batchmix.draw_plain);
    each generation's tokens are those it samples alone, beside greedy, other sampling settings
    and sampled speculation."""
    spec = SpeculationConfig("ft-small", 2, adaptive=False)

    def sampled(prompt: str, seed: int, cfg: SamplingConfig, **kw: Any) -> GenerationRequest:
        return GenerationRequest(prompt, UPSCALE, cfg, seed=seed, max_new_tokens=10, ignore_eos=True, seeded=True, **kw)

    hot, cool = SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=40, top_p=0.9)
    reqs = [sampled(SHORT, 1, hot), sampled(LONG[0], 2, hot), sampled(LONG[1], 3, cool), req(LONG[2], 10),
            sampled(SHORT, 4, cool, speculation=spec), sampled(SHORT, 1, hot)]
    expected = [alone(make, r) for r in reqs]
    assert expected[0] == expected[5] and len({tuple(e) for e in expected[:3]}) == 3
    d, scorer, _ = make()
    gens = [submit(d, r) for r in reqs]
    run_out(d)
    assert [outcome(g) for g in gens] == expected
    assert max(len(step) for step in scorer.steps()) == len(reqs)  # they did step together


def _drafts_amended(make, monkeypatch, r, name, amend, sent, kept=None):
    """Run r alone with each draft role answer's `name` (an Outcome field) passed through `amend`:
    `sent` collects (drafts, the field as the role sent it); `kept`, what the generation kept of
    it at each block (its attribute of that name). Returns the outcome."""
    d, scorer, _ = make()
    real = scorer.inner.draft_batch

    def draft_batch(role, calls):
        out = real(role, calls)
        sent.extend((o.drafts, getattr(o, name)) for o in out)
        return [dataclasses.replace(o, **{name: amend(getattr(o, name))}) for o in out]

    monkeypatch.setattr(scorer.inner, "draft_batch", draft_batch)
    g = submit(d, r)
    if kept is not None:
        drafted = g.drafted
        monkeypatch.setattr(g, "drafted", lambda *a: drafted(*a) or kept.append(getattr(g, name)))
    run_out(d)
    return outcome(g)


def test_draft_probabilities_a_role_sends_amiss_are_ignored(make, monkeypatch):
    """Each sampled draft's q(x) comes from the draft role (Outcome.draft_probs); a generation
    verifies alike with them, without them (an older logit service), and with a wrong count or
    a value outside (0, 1], which it ignores and reads q(x) from the rows instead."""
    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    r = GenerationRequest(SHORT, UPSCALE, SamplingConfig(temperature=0.9, top_p=0.9), seed=5, max_new_tokens=12,
                          ignore_eos=True, seeded=True, speculation=spec)
    sent: list[tuple[list[int], list[float]]] = []
    base = _drafts_amended(make, monkeypatch, r, "draft_probs", lambda q: q, sent)
    assert sent and all(len(q) == len(x) and all(0 < v <= 1 for v in q) for x, q in sent)  # the role sent them
    nan = float("nan")
    for amend in (lambda q: [], lambda q: q[:-1], lambda q: [0.0] + q[1:], lambda q: [nan] + q[1:],
                  lambda q: [2.0] + q[1:]):
        assert _drafts_amended(make, monkeypatch, r, "draft_probs", amend, []) == base
    assert len(base) == 12


def test_draft_cuts_a_role_sends_amiss_are_ignored(make, monkeypatch):
    """Each sampled draft row's top-p cut comes from the draft role too (Outcome.draft_cuts,
    which a rejection's residual reuses); a generation gets the same tokens with them, without
    them (an older logit service), and with a wrong count, a mass not in (0, inf) or a NaN
    threshold, which it ignores (and cuts the row itself)."""
    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    r = GenerationRequest(SHORT, UPSCALE, SamplingConfig(temperature=0.9, top_p=0.9), seed=7, max_new_tokens=12,
                          ignore_eos=True, seeded=True, speculation=spec)
    sent: list[tuple[list[int], list[tuple[float, float]]]] = []
    kept: list[list[tuple[float, float]]] = []
    base = _drafts_amended(make, monkeypatch, r, "draft_cuts", lambda c: c, sent, kept)
    assert sent and all(len(c) == len(x) and all(m > 0 for _, m in c) for x, c in sent)  # the role sent them
    assert kept and all(kept)  # and the generation kept them
    nan, inf = float("nan"), float("inf")
    for amend in (lambda c: [], lambda c: c[:-1], lambda c: [(c[0][0], 0.0)] + c[1:], lambda c: [(c[0][0], inf)] + c[1:],
                  lambda c: [(nan, c[0][1])] + c[1:], lambda c: [(c[0][0], nan)] + c[1:]):
        kept.clear()
        assert _drafts_amended(make, monkeypatch, r, "draft_cuts", amend, [], kept) == base
        assert kept and not any(kept)  # (ignored: a rejection cuts the row itself)
    assert len(base) == 12


def test_max_batch_caps_the_running_batch_and_the_rest_wait(make):
    reqs = [req(SHORT, 8)] + [req(p, 3 + i) for i, p in enumerate(LONG + [SHORT])]
    expected = [alone(make, r) for r in reqs]
    d, scorer, _ = make(SchedulerConfig(max_batch=2))
    gens = [submit(d, r) for r in reqs]
    d.scheduler.step()
    assert d.scheduler.load == (2, 3)  # two running, three waiting
    run_out(d)
    assert [outcome(g) for g in gens] == expected
    sizes = [len(step) for step in scorer.steps()]
    assert max(sizes) == 2 and sizes.count(2) >= 4


def test_times_count_steps_tokens_and_rows(make):
    d, _, _ = make()
    t = d.scheduler.times
    g = submit(d, req(SHORT, 9))
    run_out(d)
    assert len(chunks(g)) == 9 and (t.steps, t.tokens, t.rows) == (9, 9, 9)  # plain: one of each per step
    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    g = submit(d, GenerationRequest(SHORT, UPSCALE, GREEDY, seed=0, max_new_tokens=11, ignore_eos=True, seeded=True,
                                    speculation=spec))
    run_out(d)
    got = chunks(g)
    usage = got[-1].usage
    assert sum(len(c.token_ids) for c in got) == 11 and t.steps == 9 + len(got) and t.tokens == 9 + 11
    assert t.rows == 9 + len(got) + usage.speculation.drafted  # a block of k mixes k + 1 rows
    assert usage.speculation.blocks >= 1 and t.draft_s > 0 and t.score_s > 0 and t.combine_s > 0
    s = usage.speculation  # per position: every block drafted its first; kept drafts end at a rejection
    assert sum(s.drafted_at) == s.drafted and sum(s.accepted_at) == s.accepted and s.drafted_at[0] == s.blocks
    assert len(s.drafted_at) == 3 and all(a <= d for a, d in zip(s.accepted_at, s.drafted_at))
    assert s.accepted_at == sorted(s.accepted_at, reverse=True)


def test_speculation_stats_count_drafted_and_kept_drafts_per_position():
    s = SpeculationStats()
    for k, m in [(4, 4), (4, 0), (2, 1), (4, 2)]:
        s.record(k, m)
    assert (s.drafted, s.accepted, s.blocks) == (14, 7, 4)
    assert s.drafted_at == [4, 4, 3, 3] and s.accepted_at == [3, 2, 1, 1]


def test_every_block_feeds_its_drafters_shape_and_a_generations_yield_reads_it(make):
    """The controller weighs caps by what blocks of each k yield (AcceptanceShape): the shape of
    the generation's draft role, shared by every generation it drafts for, fed each block."""
    d, _, _ = make()
    spec = SpeculationConfig("ft-small", 4, adaptive=True)
    g = submit(d, GenerationRequest(SHORT, UPSCALE, GREEDY, seed=0, max_new_tokens=24, ignore_eos=True, speculation=spec))
    shape = d.scheduler.controller.shape("ft-small")
    assert g.shape is shape and d.scheduler.controller.shape("base-small") is not shape
    fresh = shape.rates(1)[0]
    run_out(d)
    s = chunks(g)[-1].usage.speculation
    assert s.blocks >= 2
    # c_1: the blocks' first drafts, shrunk toward the prior by 8 pseudo-tests (little forgotten in so few)
    assert shape.rates(1)[0] == pytest.approx((s.first_kept + 8 * fresh) / (s.blocks + 8), rel=0.01)
    assert s.first_kept == s.accepted_at[0]
    g.sink.usage.completion_tokens = 0  # as if it had its whole length still to go
    for cap in (1, 2, 4):
        assert g.expected_tokens(cap) == shape.expected_tokens(cap, s.blocks, s.first_kept)
    assert g.expected_tokens(0) == 1.0


@pytest.mark.parametrize("kind", ["score", "draft"])
def test_a_preempted_generation_resumes_with_the_same_output_sampled_speculation_included(make, kind):
    """RESOURCE_EXHAUSTED for one item (a verify at base-large, or a draft at ft-small): the
    generation goes back to the queue, re-prefills, and, its step's random draws undone, gives
    what it gives undisturbed; the other generation is untouched."""
    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    sampled = SamplingConfig(temperature=1.0, top_p=0.9)
    reqs = [GenerationRequest(SHORT, UPSCALE, sampled, seed=7, max_new_tokens=14, ignore_eos=True, seeded=True,
                              speculation=spec),
            GenerationRequest(LONG[2], UPSCALE, GREEDY, seed=0, max_new_tokens=14, ignore_eos=True, seeded=True)]
    expected = [alone(make, r) for r in reqs]
    d, scorer, clock = make()
    victim, other = (submit(d, r) for r in reqs)
    refused: list[int] = []

    def refuse(role: str, call: Any) -> EftMeshError | None:
        target = isinstance(call, DraftCall) if kind == "draft" else role == "base-large"
        if call.session_id in victim.sessions.values() and target and call.start >= 15 and not refused:
            refused.append(call.start)
            return ResourceExhausted("injected: KV cache full")
        return None

    scorer.refuse = refuse
    run_out(d, clock=clock)
    assert [outcome(victim), outcome(other)] == expected
    assert refused, "no item was refused: nothing was preempted"
    prefills = [len(c.tokens) for k, r, calls in scorer.calls if k == "score" and r == "base-large"
                for c in calls if c.start == 0 and c.session_id == victim.sessions["base-large"]]
    assert len(prefills) == 2 and prefills[1] > prefills[0] >= 10  # the prompt, then the whole sequence again
    assert prefills[1] >= refused[0]


def test_a_generation_preempted_twice_far_apart_is_not_timed_out(make):
    """The queue timeout counts a preempted generation's wait from its last progress, not from
    its first preemption."""
    expected = alone(make, req(SHORT, 40))
    d, scorer, clock = make(SchedulerConfig(queue_timeout_s=0.1))
    g = submit(d, req(SHORT, 40))
    refused: list[float] = []

    def refuse(role: str, call: Any) -> EftMeshError | None:
        clock.now += 0.003  # a call takes 3 ms (and run_out moves the clock 10 ms per step)
        late = refused and clock.now - refused[0] > 0.25
        if call.start > 0 and (not refused and call.start >= 13 or len(refused) == 1 and late):
            refused.append(clock.now)
            return ResourceExhausted("injected: KV cache full")
        return None

    scorer.refuse = refuse
    run_out(d, clock=clock)
    assert len(refused) == 2 and refused[1] - refused[0] > 0.1  # further apart than the queue timeout
    assert outcome(g) == expected


SHARED = "A long system prompt that every request of a service shares, word for word, before its question."


@pytest.mark.parametrize("caches", [True, False])
def test_a_prompt_whose_prefix_the_caches_hold_costs_the_prefill_budget_only_its_new_tokens(make, caches):
    """vLLM counts only the tokens a prefill still has to compute: once one request's prefill of
    a shared prompt has completed, three more behind it join in one step within a budget that
    holds a single whole prompt. Where a role has no prefix cache, each costs its whole prompt
    (one per step)."""
    n = len(make()[0].tokenizer.encode(SHARED))
    assert n >= 40  # whole blocks of 16 hold most of it
    expected = alone(make, req(SHARED, 4))
    d, scorer, _ = make(SchedulerConfig(prefill_tokens=n - 8))
    if not caches:
        scorer.models = {r: dataclasses.replace(m, prefix_cache=False) for r, m in scorer.models.items()}
    first = submit(d, req(SHARED, 4))
    assert d.scheduler.step()  # its prefill, alone
    later = [submit(d, req(SHARED, 4)) for _ in range(3)]
    run_out(d)
    assert [outcome(g) for g in [first, *later]] == [expected] * 4
    prefills = [p for p in scorer.prefills() if p]
    assert prefills == ([[n], [n, n, n]] if caches else [[n], [n], [n], [n]])
    assert d.scheduler.prefixes.cached(first.ids) >= n - 16  # the whole sequence is remembered when it ends


def pieces(scorer: SyncScorer, g: Generation, role: str = "base-large") -> list[tuple[int, int]]:
    """(start, tokens sent) of each of `g`'s ScoreBatch items at `role`, step by step."""
    return [(c.start, len(c.tokens) - c.start) for calls in scorer.steps(role) for c in calls
            if c.session_id == g.sessions[role]]


def test_a_long_prompt_runs_in_pieces_beside_the_running_batch_with_the_same_output(make):
    """Chunked prefill (--prefill-chunk): a prompt longer than the chunk sends each role a piece
    per step, samples nothing until its last piece, and the running generation decodes at
    every step meanwhile; every output is what it is unchunked, alone."""
    expected = [alone(make, req(SHORT, 12)), alone(make, req(LONG[0], 6))]
    d, scorer, _ = make(SchedulerConfig(prefill_chunk=10, prefill_tokens=10))
    short = submit(d, req(SHORT, 12))  # 10 tokens: no longer than a chunk, one prefill
    assert d.scheduler.step() and d.scheduler.step()  # its prefill, a decode step
    long = submit(d, req(LONG[0], 6))  # 27 tokens: pieces of 10, 10, then 7 with the first sample
    third = submit(d, req(LONG[1], 4))  # waits while the long prompt's pieces use the prefill budget
    run_out(d)
    assert [outcome(short), outcome(long)] == expected
    assert pieces(scorer, short)[:2] == [(0, 10), (10, 1)]
    assert pieces(scorer, long)[:4] == [(0, 10), (10, 10), (20, 7), (27, 1)]
    steps = scorer.steps()
    at = [i for i, calls in enumerate(steps) if any(c.session_id == long.sessions["base-large"] for c in calls)]
    # every piece runs beside the short one's decode steps: a piece has no first token to hurry,
    # so the newcomer does not get a step of its own (prefill first), as a short prompt does
    assert [len(steps[i]) for i in at[:3]] == [2, 2, 2]
    assert all(c.session_id != third.sessions["base-large"] for i in at[:3] for c in steps[i])  # it waited
    assert outcome(third) == alone(make, req(LONG[1], 4))


def test_chunked_prefill_keeps_speculation_preemption_and_every_role_exact(make):
    """The draft role takes the pieces too (by ScoreBatch), a preemption in the middle of the
    pieces re-sends them from the start, and the sampled, speculative output is unchanged."""
    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    r = GenerationRequest(LONG[0], UPSCALE, SamplingConfig(temperature=1.0, top_p=0.9), seed=5, max_new_tokens=12,
                          ignore_eos=True, seeded=True, speculation=spec)
    expected = alone(make, r)
    d, scorer, clock = make(SchedulerConfig(prefill_chunk=8))
    g = submit(d, r)
    refused: list[int] = []

    def once_at_the_second_piece(role: str, call: Any) -> EftMeshError | None:
        if role == "base-large" and call.start == 8 and not refused:
            refused.append(call.start)
            return ResourceExhausted("injected: KV cache full")
        return None

    scorer.refuse = once_at_the_second_piece
    run_out(d, clock=clock)
    assert outcome(g) == expected and refused == [8]
    # 27 tokens in pieces of 8: refused at the second piece, then all over again
    assert pieces(scorer, g)[:6] == [(0, 8), (8, 8), (0, 8), (8, 8), (16, 8), (24, 3 + 3)]  # the last: 3 + k drafts
    assert pieces(scorer, g, "ft-small")[:3] == [(0, 8), (8, 8), (0, 8)]  # the draft role's pieces


def test_a_chunked_prompt_takes_its_cached_prefix_piece_by_piece_and_says_so_in_its_usage(make):
    """Pieces of a whole number of KV blocks keep prefix caching: the second run of a long
    prompt skips its cached blocks in every piece, and `cached_prompt_tokens` sums them over
    the pieces (the least over the roles), not just the first piece's."""
    prompt = " ".join(LONG)  # 74 tokens: pieces of 16
    first = alone(make, req(prompt, 4))  # its full blocks are cached now (blocks of 16)
    d, scorer, _ = make(SchedulerConfig(prefill_chunk=16))
    g = submit(d, req(prompt, 4))
    run_out(d)
    assert outcome(g) == first
    assert [n for _, n in pieces(scorer, g)][:5] == [16, 16, 16, 16, 10]
    assert g.sink.usage.cached_prompt_tokens >= 32  # more than one piece's worth
    assert g.sink.usage.cached_prompt_tokens <= g.sink.usage.prompt_tokens


def test_only_the_mixed_roles_lag_makes_pieces_and_every_piece_leaves_the_last_token_to_sample(make):
    """A draft role outside the mix catches up in its own Draft calls, so its lag after plain
    steps starts no piece; a piece never reaches the last token, which the step that samples
    sends (an empty item would be refused)."""
    d, _, _ = make()
    spec = SpeculationConfig("ft-small", 3, adaptive=True)
    g = d.prepare(GenerationRequest(LONG[0], BASE, GREEDY, seed=0, max_new_tokens=4, seeded=True, speculation=spec))
    n = len(g.ids)  # 27
    g.cached = {"base-large": n - 1, "ft-small": 0}  # plain steps since its last block
    g.begin_step(None, chunk=8)
    assert g.piece is None and g.behind == 1
    g.undo_step()
    g.cached = {"base-large": 0, "ft-small": 0}
    g.begin_step(None, chunk=8)
    assert g.piece == {"base-large": 8, "ft-small": 8} and g.k == 0
    assert [(c.role, c.start, len(c.tokens), c.rows) for c in g.score_calls()] == [("base-large", 0, 8, 0),
                                                                                  ("ft-small", 0, 8, 0)]
    g.piece_done()
    assert g.cached == {"base-large": 8, "ft-small": 8}
    g.cached = {"base-large": 24 - 8, "ft-small": n - 1}
    g.begin_step(None, chunk=8)  # 11 behind: a piece of 8 for base-large only
    assert g.piece == {"base-large": 24}
    g.cached = {"base-large": 18, "ft-small": 18}
    g.begin_step(None, chunk=8)  # 9 behind, one more than a chunk: the piece stops short of the last token
    assert g.piece == {"base-large": n - 1, "ft-small": n - 1}
    g.undo_step()


def test_a_straggling_piece_is_set_aside_and_redone_and_the_output_is_unchanged(make):
    """A piece of a chunked prompt whose call straggles (Outcome.pending) costs its generation
    that step, undone (no role's cache counts the piece), and it redoes the piece when the call
    has ended; the other generation steps on, and both outputs are as unchunked, alone."""
    reqs = [req(LONG[0], 6), req(SHORT, 8)]
    expected = [alone(make, r) for r in reqs]
    d, scorer, _ = make(SchedulerConfig(prefill_chunk=8))
    long, other = (submit(d, r) for r in reqs)
    d.scheduler.step()  # both prompts' first pieces (the short one's 10 tokens are two pieces too)
    call: Future[Any] = Future()
    answer = scorer._batch

    def straggle(kind, role, calls, inner):
        out = answer(kind, role, calls, inner)
        if role == "base-large" and not call.done():
            return [Outcome(pending=call) if c.session_id == long.sessions[role] and c.start == 8 else o
                    for c, o in zip(calls, out)]
        return out

    scorer._batch = straggle
    d.scheduler.step()  # the second piece straggles at base-large
    assert long in d.scheduler._held and long.piece is None and long.cached["base-large"] == 8
    d.scheduler.step()  # the other generation steps on alone
    call.set_result({})
    run_out(d)
    assert [outcome(long), outcome(other)] == expected
    starts = [s for s, _ in pieces(scorer, long)]
    assert starts[:4] == [0, 8, 8, 16]  # the second piece sent twice: straggled, then redone
