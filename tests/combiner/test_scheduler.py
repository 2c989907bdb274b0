"""The scheduler without the network: the speculation controller's arithmetic, admission under
the prefill budget and max_batch, step accounting, and items that fail or run out of KV room.

Generations run through `Decoder` over in-process `ModelEngine`s of the tiny family, behind a
fake scorer that records every batched call (one per role per step) and can refuse chosen items.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from eftmesh.combiner.decoding import GenerationRequest, SpeculationConfig
from eftmesh.combiner.stream import Chunk
from eftmesh.combiner.controller import SpeculationController
from eftmesh.combiner.decoder import Decoder
from fake_scorer import RecordingScorer
from eftmesh.combiner.scheduler import SchedulerConfig
from eftmesh.combiner.scoring import DraftCall, Outcome
from eftmesh.common.errors import EftMeshError, OutOfRange, ResourceExhausted
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.engine import ModelEngine

# --- SpeculationController: pure ----------------------------------------------------------------


def test_arms_are_zero_the_powers_of_two_below_max_k_and_max_k():
    assert SpeculationController(16).arms() == [0, 1, 2, 4, 8, 16]
    assert SpeculationController(6).arms() == [0, 1, 2, 4, 6]
    assert SpeculationController(1).arms() == [0, 1]


def yields(table: dict[int, float]) -> Any:
    """expected_tokens(cap) for the controller, from a table."""
    return lambda cap: table[cap]


# a = 0.6: a block of k yields (1 - 0.6^(k+1)) / 0.4 tokens; no drafting yields 1
TOKENS = {0: 1.0, 1: 1.6, 2: 1.96, 4: 2.30, 8: 2.47, 16: 2.5}


def test_a_fresh_controller_starts_at_max_k_and_walks_down_through_the_best_caps_neighbours():
    c = SpeculationController(16, explore_every=1000)
    ms = {0: 10.0, 1: 10.5, 2: 11.0, 4: 14.0, 8: 60.0, 16: 200.0}  # cap 2 is the best
    order = []
    for _ in range(8):
        arm = c.choose(1, yields(TOKENS))
        order.append(arm)
        c.observe(1, arm, ms[arm] / 1e3)
    # 16, then its neighbour 8 (and no drafting), each better cap's smaller neighbour next, and
    # once 2 is the best and its neighbours are timed, 2 from then on
    assert order == [16, 8, 4, 2, 1, 0, 2, 2]


def test_with_nothing_timed_the_controller_starts_at_the_largest_cap_not_above_start():
    assert SpeculationController(16).choose(1, yields(TOKENS), start=4) == 4
    assert SpeculationController(16).choose(1, yields(TOKENS), start=6) == 4
    assert SpeculationController(16).choose(1, yields(TOKENS), start=0) == 0
    assert SpeculationController(6).choose(1, yields(TOKENS), start=40) == 6
    c = SpeculationController(16, explore_every=1000)
    c.observe(1, 8, 20e-3)
    assert c.choose(1, yields(TOKENS), start=2) == 4  # once something is timed, start no longer counts


def test_a_bucket_never_timed_starts_at_the_nearest_timed_buckets_best_cap_and_never_tries_far_caps():
    c = SpeculationController(16, explore_every=1000)
    light = {0: 10.0, 1: 10.5, 2: 11.0, 4: 14.0, 8: 60.0, 16: 200.0}  # batch 1: cap 2 is the best
    for _ in range(8):
        arm = c.choose(1, yields(TOKENS))
        c.observe(1, arm, light[arm] / 1e3)
    assert c.choose(2, yields(TOKENS)) == 2  # bucket 2 starts where bucket 1 is best
    heavy = {0: 100.0, 1: 190.0, 2: 290.0, 4: 490.0, 8: 900.0, 16: 1700.0}  # batch 16: verifies cost k + 1 steps
    order = []
    for _ in range(12):
        arm = c.choose(16, yields(TOKENS))
        order.append(arm)
        c.observe(16, arm, heavy[arm] / 1e3)
    # the seed; its smaller neighbour, which beats it; that one's neighbour, no drafting, which
    # beats both; from then on no drafting (its one neighbour, 1, is timed already)
    assert order == [2, 1] + [0] * 10
    assert c.snapshot()[16] == {0: 100.0, 1: 190.0, 2: 290.0}  # 4, 8 and 16 never run at this load


def test_an_unobserved_choice_stays_untried():
    c = SpeculationController(4, explore_every=1000)
    assert [c.choose(1, yields(TOKENS)) for _ in range(3)] == [4, 4, 4]  # prefill steps are not observed


def test_picks_the_cap_with_the_most_expected_tokens_per_measured_second():
    c = SpeculationController(2, explore_every=1000, smoothing=0.5)
    # light load: a step's fixed cost dominates, k = 2 costs 1.2 plain steps -> draft
    for arm, ms in [(2, 12.0), (1, 11.0), (0, 10.0)]:
        assert c.choose(1, yields(TOKENS)) == arm
        c.observe(1, arm, ms / 1e3)
    assert c.snapshot() == {1: {0: 10.0, 1: 11.0, 2: 12.0}}
    assert c.choose(1, yields(TOKENS)) == 2  # 1.96 / 12 > 1.6 / 11 > 1 / 10
    # saturated: verifies now cost k + 1 plain steps -> stop drafting
    for _ in range(6):
        c.observe(1, 2, 30e-3)
        c.observe(1, 1, 20e-3)
    assert c.choose(1, yields(TOKENS)) == 0
    # and the yields come from the generations: perfect agreement makes drafting pay again
    assert c.choose(1, yields({0: 1.0, 1: 2.0, 2: 3.0})) == 2


def test_explores_the_best_caps_less_recently_used_neighbour_every_explore_every_steps():
    c = SpeculationController(2, explore_every=5)
    for arm, ms in [(2, 30.0), (1, 10.0), (0, 10.0)]:  # steps 1-3
        assert c.choose(1, yields(TOKENS)) == arm
        c.observe(1, arm, ms / 1e3)
    assert c.choose(1, yields(TOKENS)) == 1  # step 4: exploit (1.6 / 10 ms)
    c.observe(1, 1, 10e-3)
    assert c.choose(1, yields(TOKENS)) == 2  # step 5: explore; of 1's neighbours, 2 (step 1) is older
    c.observe(1, 2, 30e-3)
    assert [c.choose(1, yields(TOKENS)) for _ in range(4)] == [1, 1, 1, 1]  # steps 6-9, unobserved
    assert c.choose(1, yields(TOKENS)) == 0  # step 10: now 0 (step 3) is the older neighbour


def test_explores_only_the_best_caps_neighbours():
    c = SpeculationController(16, explore_every=3)
    ms = {0: 10.0, 1: 11.0, 2: 11.5, 4: 30.0, 8: 60.0, 16: 120.0}  # cap 2 is the best
    for arm in reversed(c.arms()):  # 16, 8, 4, 2, 1, 0 timed once each
        assert c.choose(1, yields(TOKENS)) == arm
        c.observe(1, arm, ms[arm] / 1e3)
    explored = []
    for _ in range(12):
        arm = c.choose(1, yields(TOKENS))
        explored.append(arm)
        c.observe(1, arm, ms[arm] / 1e3)
    assert set(explored) == {0, 1, 2, 4}  # neighbours and no drafting; never the far-off 16 or 8
    assert explored.count(2) == 8


def test_statistics_are_kept_per_batch_size_bucket():
    assert [SpeculationController.bucket(b) for b in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 1, 2, 4, 4, 8, 8, 16, 16, 32]
    c = SpeculationController(1, explore_every=1000)
    for arm, ms in [(1, 40.0), (0, 10.0)]:  # bucket 4: a verify costs 4 plain steps
        assert c.choose(3, yields(TOKENS)) == arm
        c.observe(3, arm, ms / 1e3)
    assert c.choose(4, yields(TOKENS)) == 0  # same bucket as 3: drafting lost there
    assert c.choose(16, yields(TOKENS)) == 0  # another bucket, nothing timed there: bucket 4's best
    c.observe(16, 0, 10e-3)
    assert c.choose(16, yields(TOKENS)) == 1  # then its neighbour
    c.observe(16, 1, 12e-3)
    assert c.choose(9, yields(TOKENS)) == 1  # bucket 16: drafting wins there (1.6 / 12 > 1 / 10)
    assert c.snapshot() == {4: {0: 10.0, 1: 40.0}, 16: {0: 10.0, 1: 12.0}}


def test_observe_ignores_non_positive_durations():
    c = SpeculationController(2)
    c.observe(1, 2, 0.0)
    c.observe(1, 2, -0.5)
    assert c.snapshot() == {}
    assert c.choose(1, yields(TOKENS)) == 2  # still untried


def test_scheduler_config_defaults():
    cfg = SchedulerConfig()
    assert (cfg.max_batch, cfg.prefill_tokens, cfg.queue_timeout_s) == (32, 512, 30.0)


# --- a fake scorer over in-process engines -------------------------------------------------------


class FakeScorer(RecordingScorer):
    """The recording fake (fake_scorer.py), with every call delayed by `delay_s` and the first
    call held at `gate` until the test opens it (so generations can be queued before the next
    admission)."""

    def __init__(self, engines: dict[str, ModelEngine]) -> None:
        super().__init__(engines)
        self.delay_s = 0.0
        self.gate: threading.Event | None = None
        self.held = threading.Event()

    def _batch(self, kind: str, role: str, calls: Sequence[Any], inner: Callable[..., list[Outcome]]) -> list[Outcome]:
        gate = self.gate
        if gate is not None:
            self.held.set()
            assert gate.wait(30)
            self.gate = None
        time.sleep(self.delay_s)
        return super()._batch(kind, role, calls, inner)


@pytest.fixture(scope="module")
def engines(tiny_family: dict[str, Path]) -> dict[str, ModelEngine]:
    torch.set_num_threads(1)
    return {r: ModelEngine.from_pretrained(str(p), role=r) for r, p in tiny_family.items()}


@pytest.fixture(scope="module")
def tokenizer(tiny_family: dict[str, Path]) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


@pytest.fixture
def make_decoder(engines, tokenizer) -> Iterator[Callable[..., tuple[Decoder, FakeScorer]]]:
    made: list[Decoder] = []

    def make(config: SchedulerConfig = SchedulerConfig(), max_k: int = 16) -> tuple[Decoder, FakeScorer]:
        scorer = FakeScorer(engines)
        d = Decoder(scorer, tokenizer, len(tokenizer), config, max_k)
        made.append(d)
        return d, scorer

    yield make
    for d in made:
        d.close()
    assert all(len(e.sessions) == 0 and e.pool.used_blocks == 0 for e in engines.values()), "a cache was left behind"


BASE = Composition("base-large")
UPSCALE = Composition("base-large", (Delta("ft-small", "base-small", 1.0),))
GREEDY = SamplingConfig(temperature=0.0)
SHORT = "The quick brown fox"  # 10 tokens
LONG = [  # 27, 21 and 24 tokens
    "It is a truth universally acknowledged, that a single man",
    "In the beginning God created the heaven and the earth.",
    "Numbers 0 1 2 3 4 5 6 7 8 9.",
]


def req(prompt: str, n: int, comp: Composition = BASE, sampling: SamplingConfig = GREEDY, seed: int = 0,
        spec: SpeculationConfig | None = None) -> GenerationRequest:
    return GenerationRequest(prompt, comp, sampling, seed=seed, max_new_tokens=n, speculation=spec, ignore_eos=True,
                             seeded=True, logprobs=True)


class Run:
    """A generation consumed on its own thread: its chunks, or its error."""

    def __init__(self, decoder: Decoder, r: GenerationRequest) -> None:
        self.chunks: list[Chunk] = []
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._consume, args=(decoder, r))
        self._t.start()

    def _consume(self, decoder: Decoder, r: GenerationRequest) -> None:
        try:
            for c in decoder.generate(r):
                self.chunks.append(c)
        except BaseException as e:  # inspected by the test
            self.error = e

    def tokens(self) -> list[int]:
        self._t.join(60)
        assert not self._t.is_alive()
        if self.error is not None:
            raise self.error
        return [t for c in self.chunks for t in c.token_ids]


def alone(decoder: Decoder, r: GenerationRequest) -> list[int]:
    return Run(decoder, r).tokens()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def queue_behind_a_held_step(decoder: Decoder, scorer: FakeScorer, first: GenerationRequest,
                             rest: list[GenerationRequest]) -> list[Run]:
    """Start `first`, hold its first step in the scorer, queue `rest`, then let the loop go on:
    the next admission sees all of `rest` waiting at once."""
    scorer.gate = gate = threading.Event()
    runs = [Run(decoder, first)]
    assert scorer.held.wait(30)
    for r in rest:
        runs.append(Run(decoder, r))
        wait_for(lambda n=len(runs) - 1: decoder.scheduler.load[1] == n)
    assert decoder.scheduler.load == (1, len(rest))
    gate.set()
    return runs


# --- admission ----------------------------------------------------------------------------------


def test_a_small_prefill_budget_admits_one_long_prompt_per_step_while_the_batch_keeps_stepping(make_decoder, tokenizer):
    assert [len(tokenizer.encode(p)) for p in LONG] == [27, 21, 24]
    decoder, scorer = make_decoder(SchedulerConfig(prefill_tokens=8))
    reqs = [req(SHORT, 12)] + [req(p, 6) for p in LONG]
    expected = [alone(decoder, r) for r in reqs]
    scorer.calls.clear()

    runs = queue_behind_a_held_step(decoder, scorer, reqs[0], reqs[1:])
    assert [r.tokens() for r in runs] == expected
    steps = scorer.steps()
    prefills = [[len(c.tokens) for c in step if c.start == 0] for step in steps]
    assert prefills[:5] == [[10], [27], [21], [24], []]  # one long prompt joins per step
    # Prefill first, never twice in a row: steps 1 and 3 run their newcomer alone, steps 2 and 4
    # step everyone; the first generation never misses two steps running, one token each.
    assert [len(s) for s in steps[1:5]] == [1, 3, 1, 4]
    running = steps[0][0].session_id
    stepped = []
    for step in steps[1:12]:
        mine = [c for c in step if c.session_id == running]
        assert len(mine) <= 1 and all(len(c.tokens) - c.start == 1 for c in mine)
        stepped.append(bool(mine))
    assert stepped[:4] == [False, True, False, True] and all(stepped[4:])
    assert max(len(s) for s in steps) == 4


def test_a_large_prefill_budget_admits_every_waiting_prompt_in_one_step(make_decoder):
    decoder, scorer = make_decoder(SchedulerConfig(prefill_tokens=512))
    reqs = [req(SHORT, 6)] + [req(p, 4) for p in LONG]
    runs = queue_behind_a_held_step(decoder, scorer, reqs[0], reqs[1:])
    for r in runs:
        r.tokens()
    prefills = [[len(c.tokens) for c in step if c.start == 0] for step in scorer.steps()]
    assert prefills[:2] == [[10], [27, 21, 24]]


def test_max_batch_caps_the_running_batch_and_the_rest_wait(make_decoder):
    decoder, scorer = make_decoder(SchedulerConfig(max_batch=2))
    reqs = [req(SHORT, 8)] + [req(p, 3 + i) for i, p in enumerate(LONG + [SHORT])]
    expected = [alone(decoder, r) for r in reqs]
    scorer.calls.clear()

    runs = queue_behind_a_held_step(decoder, scorer, reqs[0], reqs[1:])  # one running, four waiting
    assert [r.tokens() for r in runs] == expected
    sizes = [len(step) for step in scorer.steps()]
    assert max(sizes) == 2 and sizes.count(2) >= 4
    wait_for(lambda: decoder.scheduler.load == (0, 0))


# --- step accounting --------------------------------------------------------------------------


def test_times_count_steps_tokens_and_rows(make_decoder):
    decoder, _ = make_decoder()
    t = decoder.scheduler.times
    run = Run(decoder, req(SHORT, 9))
    assert len(run.tokens()) == 9
    wait_for(lambda: t.tokens >= 9)  # counted just after the last chunk is handed over
    assert (t.steps, t.tokens, t.rows) == (9, 9, 9)  # plain: one step, one token, one row each
    assert len(run.chunks) == 9

    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    run = Run(decoder, req(SHORT, 11, comp=UPSCALE, spec=spec))
    assert len(run.tokens()) == 11
    wait_for(lambda: t.tokens >= 9 + 11)
    usage = run.chunks[-1].usage
    steps = len(run.chunks)  # one chunk per step
    assert t.steps == 9 + steps and t.tokens == 9 + 11
    assert t.rows == 9 + steps + usage.speculation.drafted  # a block of k mixes k + 1 rows
    assert usage.speculation.blocks >= 1 and t.draft_s > 0 and t.score_s > 0 and t.combine_s > 0


# --- failing items and preemption --------------------------------------------------------------


def test_an_item_refused_by_one_role_fails_only_its_generation(make_decoder, engines):
    decoder, scorer = make_decoder()
    reqs = [req(SHORT, 10, comp=UPSCALE), req(LONG[0], 10, comp=UPSCALE),
            req(LONG[1], 10, comp=UPSCALE, sampling=SamplingConfig(temperature=1.0, top_p=0.9), seed=3,
                spec=SpeculationConfig("ft-small", 2, adaptive=False))]
    expected = [alone(decoder, r) for r in reqs]
    scorer.calls.clear()
    victim: dict[str, str] = {}

    def refuse(role: str, call: Any) -> EftMeshError | None:
        if role == "base-small" and call.start == 0 and len(call.tokens) == 27:
            victim["sid"] = call.session_id
        if call.session_id == victim.get("sid") and call.start >= 29:  # its 4th step (27 prompt tokens)
            return OutOfRange("injected: beyond this role's context")
        return None

    scorer.refuse = refuse
    runs = [Run(decoder, r) for r in reqs]
    with pytest.raises(OutOfRange, match="injected"):
        runs[1].tokens()
    assert len([t for c in runs[1].chunks for t in c.token_ids]) == 3
    assert [runs[0].tokens(), runs[2].tokens()] == [expected[0], expected[2]]
    sid = victim["sid"].rpartition(":")[0]
    wait_for(lambda: all(f"{sid}:{r}" not in e.sessions._sessions for r, e in engines.items()))


@pytest.mark.parametrize("kind", ["score", "draft"])
def test_a_preempted_generation_resumes_with_the_same_output(make_decoder, kind):
    """RESOURCE_EXHAUSTED for one item (a verify at base-large, or a draft at ft-small): the
    generation goes back to the queue, re-prefills, and, its step's random draws undone, gives
    what it gives undisturbed, seeded sampling included; the other generation is untouched."""
    decoder, scorer = make_decoder()
    spec = SpeculationConfig("ft-small", 3, adaptive=False)
    sampled = SamplingConfig(temperature=1.0, top_p=0.9)
    reqs = [req(SHORT, 14, comp=UPSCALE, sampling=sampled, seed=7, spec=spec), req(LONG[2], 14, comp=UPSCALE)]
    expected = [alone(decoder, r) for r in reqs]
    scorer.calls.clear()
    victim: dict[str, str] = {}
    refused: list[int] = []

    def refuse(role: str, call: Any) -> EftMeshError | None:
        if call.start == 0 and len(call.tokens) == 10:
            victim.setdefault("rid", call.session_id.rpartition(":")[0])
        mine = call.session_id.rpartition(":")[0] == victim.get("rid")
        target = isinstance(call, DraftCall) if kind == "draft" else role == "base-large"
        if mine and target and call.start >= 15 and not refused:
            refused.append(call.start)
            return ResourceExhausted("injected: KV cache full")
        return None

    scorer.refuse = refuse
    runs = [Run(decoder, r) for r in reqs]
    assert [r.tokens() for r in runs] == expected
    assert refused, "no item was refused: nothing was preempted"
    prefills = [len(c.tokens) for k, r, calls in scorer.calls if k == "score" and r == "base-large"
                for c in calls if c.start == 0 and c.session_id.rpartition(":")[0] == victim["rid"]]
    assert len(prefills) == 2 and prefills[1] > prefills[0] >= 10  # the prompt, then the whole sequence again
    assert prefills[1] >= refused[0]


def test_a_generation_preempted_twice_far_apart_is_not_timed_out(make_decoder):
    decoder, scorer = make_decoder(SchedulerConfig(queue_timeout_s=0.1))
    r = req(SHORT, 40)
    expected = alone(decoder, r)
    scorer.delay_s = 0.01  # 40 steps take about 0.4 s
    refused: list[float] = []

    def refuse(role: str, call: Any) -> EftMeshError | None:
        late = refused and time.monotonic() - refused[0] > 0.25
        if call.start > 0 and (not refused and call.start >= 13 or len(refused) == 1 and late):
            refused.append(time.monotonic())  # each wait for room is short: it is re-admitted at once
            return ResourceExhausted("injected: KV cache full")
        return None

    scorer.refuse = refuse
    got = alone(decoder, r)
    assert len(refused) == 2
    assert got == expected


def test_the_combiner_has_more_workers_than_admitted_generations():
    """Each streaming generation holds a gRPC worker thread: with no spare one, a request past
    --max-concurrent-generations would wait in gRPC's queue instead of being refused at once."""
    from eftmesh.combiner.server import parse_args

    base = ["--upstream", "base-large=h:1", "--tokenizer", "x", "--no-default-delta"]
    cfg = parse_args([*base, "--max-concurrent-generations", "100"], environ={})
    assert cfg.server.workers == 132 and cfg.max_concurrent_generations == 100
    assert cfg.scheduler == SchedulerConfig()
    with pytest.raises(SystemExit):
        parse_args([*base, "--max-concurrent-generations", "64", "--workers", "64"], environ={})
