"""Continuous batching through a real loopback mesh: batched output equals unbatched output.

(a) 16 concurrent greedy generations (four compositions x four speculation modes, lengths 3-20,
    stop strings) give the tokens, text, finish reason and log-probs each gives alone;
(b) seeded sampling (plain, fixed k=3, adaptive) is the same alone and among other traffic;
(c) a stream cancelled mid-way leaves the others exact and its caches are released at once;
(d) at a small KV budget the combiner preempts and re-prefills (still exact), a generation
    longer than the pool stops at CONTEXT, and a prompt that gets no room within the queue
    timeout fails with RESOURCE_EXHAUSTED naming the KV cache, alone;
(e) an item one upstream refuses (a block larger than its --max-k) fails only its own
    generation, inside a DraftBatch it shares with a generation that goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from conftest import idle, start_combiner, start_logit, wait_for
from eftmesh.combiner.scheduler import SchedulerConfig
from eftmesh.combiner.server import CombinerServer
from eftmesh.common.errors import ResourceExhausted
from eftmesh.logit.server import LogitServer
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

D = generator_pb2.Delta
COMPOSITIONS = {
    "upscale": generator_pb2.Composition(base="base-large", deltas=[D(tuned="ft-small", reference="base-small", weight=1.0)]),
    "base": generator_pb2.Composition(base="base-large"),
    "amplified": generator_pb2.Composition(base="ft-small", deltas=[D(tuned="base-large", reference="base-small", weight=1.5)]),
    "two-deltas": generator_pb2.Composition(
        base="base-large",
        deltas=[D(tuned="ft-small", reference="base-small", weight=0.75), D(tuned="base-small", reference="base-large", weight=0.25)],
    ),
}
OFF = generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_OFF)


def fixed(k: int, draft_role: str = "") -> generator_pb2.Speculation:
    return generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_FIXED, k=k, draft_role=draft_role)


def adaptive(draft_role: str = "") -> generator_pb2.Speculation:
    return generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_ADAPTIVE, draft_role=draft_role)


# The base-only composition has no delta to draft with: it drafts with ft-small explicitly.
MODES: dict[str, Callable[[str], generator_pb2.Speculation]] = {
    "off": lambda comp: OFF,
    "k2": lambda comp: fixed(2, "ft-small" if comp == "base" else ""),
    "k4": lambda comp: fixed(4, "ft-small" if comp == "base" else ""),
    "adaptive": lambda comp: adaptive("ft-small" if comp == "base" else ""),
}
PROMPTS = [
    "The quick brown fox",
    "It is a truth universally acknowledged, that a single man",
    "Question: Where does Mara live? Answer:",
    "In the beginning God created the heaven and the earth.",
    "Numbers 0 1 2 3",
]
# 59 tokens: four blocks of 16
LONG_PROMPT = ("And the earth was without form, and void; and darkness was upon the face of the deep. "
               "The quick brown fox jumps over the lazy dog.")
GREEDY = tensor_pb2.SamplingParams(temperature=0.0)


def request(prompt: str, comp: str, spec: generator_pb2.Speculation, n: int, **kw: Any) -> generator_pb2.CompleteRequest:
    kw.setdefault("sampling", GREEDY)
    return generator_pb2.CompleteRequest(prompt=prompt, composition=COMPOSITIONS[comp], speculation=spec, max_new_tokens=n, **kw)


def result(resp: generator_pb2.CompleteResponse) -> tuple[list[int], str, int]:
    return list(resp.token_ids), resp.text, resp.finish_reason


def concurrently(jobs: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Run every job on its own thread, all released at once; each job's result or exception."""
    barrier = threading.Barrier(len(jobs))

    def run(job: Callable[[], Any]) -> Any:
        barrier.wait(timeout)
        try:
            return job()
        except Exception as e:  # returned for the test to inspect
            return e

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result(timeout) for f in [pool.submit(run, j) for j in jobs]]


def settled(logits: dict[str, LogitServer], call: Callable[[], T]) -> T:
    """`call()`, then wait until the services have freed its sessions: the combiner releases
    them fire-and-forget, so a request sent right after a finished one can find its blocks
    still held and be queued or preempted, which a test of one request alone must not see."""
    out = call()
    assert wait_for(idle(logits), 5.0), "the services still hold sessions 5 s after the call ended"
    return out


def stub_of(cs: CombinerServer) -> tuple[grpc.Channel, generator_pb2_grpc.GeneratorStub]:
    ch = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    return ch, generator_pb2_grpc.GeneratorStub(ch)


# --- (a) greedy: 16 mixed generations at once ------------------------------------------------


def _sixteen() -> list[tuple[str, str, int, bool]]:
    """(composition, mode, max_new_tokens, with a stop string): every composition with every mode."""
    cases = []
    for i, comp in enumerate(COMPOSITIONS):
        for j, mode in enumerate(MODES):
            n = 3 + (5 * i + 7 * j) % 18  # 3..20
            cases.append((comp, mode, n, (i + j) % 4 == 1))
    return cases


def test_sixteen_concurrent_greedy_generations_equal_each_alone(mesh):
    cases = _sixteen()
    assert len(cases) == 16 and {n for *_, n, _ in cases} <= set(range(3, 21))
    stub, scheduler = mesh.generator, mesh.combiner.decoder.scheduler
    reqs = []
    for idx, (comp, mode, n, with_stop) in enumerate(cases):
        prompt = PROMPTS[idx % len(PROMPTS)]
        stop: list[str] = []
        if with_stop:  # a stop string taken from the text this request gives without one
            text = stub.Complete(request(prompt, comp, MODES[mode](comp), 20)).text
            assert len(text) >= 6, text
            stop = [text[3:5]]
        reqs.append(request(prompt, comp, MODES[mode](comp), n, stop=stop, logprobs=True))

    steps0 = scheduler.times.steps
    alone = [stub.Complete(r) for r in reqs]
    alone_steps = scheduler.times.steps - steps0
    assert sum(r.finish_reason == generator_pb2.FINISH_REASON_STOP for r in alone) >= 3
    assert any(r.speculation.blocks for r in alone)

    steps0 = scheduler.times.steps
    together = concurrently([lambda r=r: stub.Complete(r, timeout=60) for r in reqs])
    together_steps = scheduler.times.steps - steps0

    for case, a, t in zip(cases, alone, together):
        assert not isinstance(t, Exception), (case, t)
        assert result(t) == result(a), case
        assert len(t.logprobs) == len(a.logprobs) == len(a.token_ids) > 0
        assert max(abs(x - y) for x, y in zip(t.logprobs, a.logprobs)) <= 1e-4, case
        assert t.usage.completion_tokens == len(t.token_ids)
    # They really shared steps: far fewer scheduler steps than running them one by one.
    assert together_steps <= alone_steps // 2, (together_steps, alone_steps)
    assert wait_for(idle(mesh.logits), 5.0)


# --- (b) seeded sampling ---------------------------------------------------------------------


def test_seeded_sampling_is_the_same_alone_and_among_other_traffic(mesh):
    stub = mesh.generator
    seeded = []
    for i in range(12):
        comp = list(COMPOSITIONS)[i % 4]
        mode = "adaptive" if i == 11 else ("off" if i % 2 == 0 else "k3")
        spec = MODES["adaptive"](comp) if mode == "adaptive" else OFF if mode == "off" else fixed(3, "ft-small" if comp == "base" else "")
        sampling = tensor_pb2.SamplingParams(temperature=0.8 if i % 3 else 1.0, top_p=0.9)
        seeded.append(request(PROMPTS[i % len(PROMPTS)], comp, spec, 8 + i, sampling=sampling, seed=100 + i, ignore_eos=True))
    # Other traffic: unseeded sampling and greedy, some speculating (the load controller acts on them).
    others = [
        request(PROMPTS[i % 5], list(COMPOSITIONS)[i % 4], MODES["adaptive"]("base" if i % 4 == 1 else ""), 20,
                sampling=tensor_pb2.SamplingParams(temperature=1.0) if i % 2 else GREEDY)
        for i in range(6)
    ]
    alone = [list(stub.Complete(r).token_ids) for r in seeded]
    assert all(len(a) == 8 + i for i, a in enumerate(alone))  # ignore_eos: exactly max_new_tokens

    together = concurrently([lambda r=r: stub.Complete(r, timeout=60) for r in seeded + others])
    assert not [t for t in together if isinstance(t, Exception)]
    assert [list(t.token_ids) for t in together[:12]] == alone
    assert together[11].speculation.blocks > 0  # the adaptive one did speculate
    # The seed matters: another seed gives other tokens.
    other_seed = generator_pb2.CompleteRequest()
    other_seed.CopyFrom(seeded[0])
    other_seed.seed = 999
    assert list(stub.Complete(other_seed).token_ids) != alone[0]


# --- (c) cancellation ------------------------------------------------------------------------


def test_a_cancelled_stream_leaves_the_others_exact_and_releases_its_caches(mesh):
    """The others decode base-large alone, so base-small and ft-small hold the cancelled
    generation's sessions only; its base-large session is found through its request id."""
    stub = mesh.generator
    assert wait_for(idle(mesh.logits), 5.0)
    others = [
        generator_pb2.GenerateRequest(prompt=PROMPTS[i], composition=COMPOSITIONS["base"], speculation=OFF,
                                      sampling=GREEDY, max_new_tokens=40 + 5 * i, ignore_eos=True)
        for i in range(4)
    ]
    alone = [[t for c in stub.Generate(r) for t in c.token_ids] for r in others]

    got: list[list[int]] = [[] for _ in others]
    started = threading.Barrier(len(others) + 1)
    done = [False] * len(others)

    def consume(i: int) -> None:
        stream = stub.Generate(others[i], timeout=60)
        first = next(stream)
        got[i].extend(first.token_ids)
        started.wait(30)
        for c in stream:
            got[i].extend(c.token_ids)
        done[i] = True

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(others))]
    for t in threads:
        t.start()
    started.wait(30)  # every other generation is running

    victim = generator_pb2.GenerateRequest(prompt=PROMPTS[0], composition=COMPOSITIONS["upscale"], speculation=OFF,
                                           sampling=GREEDY, max_new_tokens=60, ignore_eos=True)
    call = stub.Generate(victim, timeout=60)
    chunks = [next(call), next(call)]
    small = {r: mesh.logits[r].engine for r in ("base-small", "ft-small")}
    assert all(len(g.sessions) == 1 and g.pool.used_blocks > 0 for g in small.values())
    rid = next(iter(small["base-small"].sessions._sessions)).rpartition(":")[0]  # "<request id>:<role>"
    large = mesh.logits["base-large"].engine
    assert f"{rid}:base-large" in large.sessions._sessions
    call.cancel()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        for c in call:
            chunks.append(c)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert wait_for(lambda: all(len(g.sessions) == 0 and g.pool.used_blocks == 0 for g in small.values())
                    and f"{rid}:base-large" not in large.sessions._sessions, 2.0)
    released_after = time.monotonic() - t0
    still_running = not all(done)
    for t in threads:
        t.join(60)
    assert len(chunks) < 60
    assert got == alone
    assert still_running, f"the others finished before the cancelled caches were released ({released_after:.2f} s)"
    assert wait_for(idle(mesh.logits), 5.0)


# --- (d) the KV budget -----------------------------------------------------------------------

KV_TOKENS = 80  # five blocks of 16 per logit service


@pytest.fixture(scope="module")
def small_kv(tiny_family: dict[str, Path]) -> Iterator[dict[str, LogitServer]]:
    logits = {role: start_logit(path, role, kv_cache_tokens=KV_TOKENS, kv_block_size=16) for role, path in tiny_family.items()}
    yield logits
    for ls in logits.values():
        ls.server.stop(0).wait()


class ExhaustionSpy:
    """Counts the items a role refused with RESOURCE_EXHAUSTED, seen through the combiner's scorer."""

    def __init__(self, cs: CombinerServer) -> None:
        self.count = 0
        scorer, inner_score, inner_draft = cs.scorer, cs.scorer.score_batch, cs.scorer.draft_batch

        def counted(inner: Callable[..., Any]) -> Callable[..., Any]:
            def call(role: str, calls: Any, partial: bool = False) -> Any:
                out = inner(role, calls, partial)
                self.count += sum(isinstance(o.error, ResourceExhausted) for o in out)
                return out

            return call

        scorer.score_batch = counted(inner_score)  # type: ignore[method-assign]
        scorer.draft_batch = counted(inner_draft)  # type: ignore[method-assign]


def test_generations_beyond_the_kv_budget_are_preempted_and_still_exact(tiny_family, small_kv):
    assert all(ls.engine.pool.num_blocks == 5 for ls in small_kv.values())
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in small_kv.items()})
    ch, stub = stub_of(cs)
    try:
        spy = ExhaustionSpy(cs)
        specs = [OFF, fixed(2), OFF, adaptive()]
        reqs = [request(PROMPTS[i], "upscale", specs[i], 30 + 3 * i, ignore_eos=True, logprobs=True) for i in range(4)]
        alone = [settled(small_kv, lambda r=r: stub.Complete(r)) for r in reqs]
        assert spy.count == 0  # each fits alone
        need = sum(-(-(r.usage.prompt_tokens + r.usage.completion_tokens) // 16) for r in alone)
        assert need > 5  # together they need more blocks than a service has

        together = concurrently([lambda r=r: stub.Complete(r, timeout=60) for r in reqs])
        for a, t in zip(alone, together):
            assert not isinstance(t, Exception), t
            assert result(t) == result(a)
            assert max(abs(x - y) for x, y in zip(t.logprobs, a.logprobs)) <= 1e-4
        assert spy.count > 0  # the budget was hit, and preemption absorbed it
        assert wait_for(idle(small_kv), 5.0)
    finally:
        ch.close()
        cs.stop(0)


def test_a_generation_longer_than_the_pool_stops_at_its_context(mesh, tiny_family, small_kv):
    """One session can never hold more than a service's whole pool: Info reports the pool as
    the context, and the generation ends there (finish reason CONTEXT) instead of failing."""
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in small_kv.items()})
    ch, stub = stub_of(cs)
    try:
        info = stub.Info(generator_pb2.GeneratorInfoRequest())
        assert {u.max_context for u in info.upstreams} == {KV_TOKENS}
        huge = request(PROMPTS[1], "upscale", fixed(4), 64, ignore_eos=True)  # 27 + 64 > 80 tokens
        got = stub.Complete(huge, timeout=60)
        assert got.finish_reason == generator_pb2.FINISH_REASON_CONTEXT
        assert got.usage.prompt_tokens + got.usage.completion_tokens == KV_TOKENS
        roomy = mesh.generator.Complete(huge)  # the shared mesh's pool is large
        assert list(got.token_ids) == list(roomy.token_ids)[: len(got.token_ids)]
        assert wait_for(idle(small_kv), 5.0)
    finally:
        ch.close()
        cs.stop(0)


def test_a_prompt_that_gets_no_kv_room_in_time_fails_alone_with_resource_exhausted(tiny_family, small_kv):
    """A long generation holds two to four of the five blocks; a 59-token prompt (four blocks)
    waits for room, longer than the combiner's 0.1 s queue timeout: RESOURCE_EXHAUSTED naming
    the KV cache, while the running generation finishes exactly, and a small request sent next
    (new requests do not overtake a preempted one) finishes exactly too."""
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in small_kv.items()},
                        scheduler=SchedulerConfig(queue_timeout_s=0.1))
    ch, stub = stub_of(cs)
    try:
        spy = ExhaustionSpy(cs)
        running = generator_pb2.GenerateRequest(prompt=PROMPTS[0], composition=COMPOSITIONS["upscale"], speculation=OFF,
                                                sampling=GREEDY, max_new_tokens=60, ignore_eos=True)
        blocked = request(LONG_PROMPT, "upscale", OFF, 8, ignore_eos=True)
        small = request(PROMPTS[4], "upscale", OFF, 4, ignore_eos=True)
        alone_running = settled(small_kv, lambda: [t for c in stub.Generate(running) for t in c.token_ids])
        alone_blocked = result(settled(small_kv, lambda: stub.Complete(blocked)))
        alone_small = result(settled(small_kv, lambda: stub.Complete(small)))
        assert spy.count == 0 and len(alone_blocked[0]) == 8  # each fits alone

        stream = stub.Generate(running, timeout=60)
        got = [t for _, c in zip(range(12), stream) for t in c.token_ids]  # 22 tokens cached: 2 blocks
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: stub.Complete(blocked, timeout=60))
            assert wait_for(lambda: spy.count > 0, 10.0)  # the long prompt found no room
            with pytest.raises(grpc.RpcError) as e:
                fut.result(60)
            got_small = stub.Complete(small, timeout=30)
        for c in stream:
            got.extend(c.token_ids)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV cache" in e.value.details()
        assert result(got_small) == alone_small
        assert got == alone_running
        assert wait_for(idle(small_kv), 5.0)
    finally:
        ch.close()
        cs.stop(0)


# --- (e) a bad item fails only its own generation --------------------------------------------


def test_an_item_one_upstream_refuses_fails_only_its_generation(mesh, tiny_family):
    """A second ft-small service, role ft-capped, drafts at most 2 tokens per block. The
    combiner accepts k=4 for it (its --max-k is 16), the service refuses that item with
    INVALID_ARGUMENT, and the k=2 generation in the same DraftBatch goes on exactly. (Sent at
    the same moment, both usually join the same step; the round is repeated until they did.)"""
    capped = start_logit(tiny_family["ft-small"], "ft-capped", max_k=2)
    ports = {r: ls.server.port for r, ls in mesh.logits.items()} | {"ft-capped": capped.server.port}
    cs = start_combiner(tiny_family["base-small"], ports)
    # The combiner caps its block to ft-capped's --max-k at start; undo that, as for a
    # replica restarted later with a smaller --max-k, so that k=4 reaches the service.
    assert cs.servicer is not None and cs.servicer.effective_defaults().speculation.max_k == 2
    cs.decoder.cap._value = 16  # (the cap only ever goes down: this test sets it back by hand)
    ch, stub = stub_of(cs)
    mixed_calls: list[list[int]] = []
    inner = cs.scorer.draft_batch

    def spy(role: str, calls: Any, partial: bool = False) -> Any:
        if role == "ft-capped":
            mixed_calls.append(sorted(c.k for c in calls))
        return inner(role, calls, partial)

    cs.scorer.draft_batch = spy  # type: ignore[method-assign]
    try:
        good_capped = generator_pb2.CompleteRequest(prompt=PROMPTS[0], composition=COMPOSITIONS["base"], sampling=GREEDY,
                                                    speculation=fixed(2, "ft-capped"), max_new_tokens=40, ignore_eos=True)
        good_other = request(PROMPTS[2], "upscale", fixed(4), 20, ignore_eos=True)
        bad = request(PROMPTS[3], "base", fixed(4, "ft-capped"), 12)
        alone_capped = result(stub.Complete(good_capped))
        alone_other = result(stub.Complete(good_other))
        for _ in range(5):
            mixed_calls.clear()
            together = concurrently([lambda: stub.Complete(bad, timeout=60), lambda: stub.Complete(good_capped, timeout=60),
                                     lambda: stub.Complete(good_other, timeout=60)])
            err = together[0]
            assert isinstance(err, grpc.RpcError)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ft-capped" in err.details() and "k must be in [1, 2]" in err.details()
            assert result(together[1]) == alone_capped
            assert result(together[2]) == alone_other
            if [2, 4] in mixed_calls:
                break
        assert [2, 4] in mixed_calls  # the refused item shared its DraftBatch with a good one
        assert wait_for(idle(mesh.logits | {"ft-capped": capped}), 5.0)
    finally:
        ch.close()
        cs.stop(0)
        capped.server.stop(0).wait()
