"""A replica that hangs (answers nothing, its health still SERVING: a stuck model) costs the
generations on it a re-prefill on the other replica after a derived deadline, not a stall of
every stream; once it wakes, the sessions moved off it are released there. A draft replica that
hangs while holding every drafting generation stalls only those.

Real services on loopback, in-process; the hang is one call held in the replica's servicer
(deterministic, unlike a signal: the call's worker thread waits on an event while the server
and its health go on)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import start_combiner, start_logit
from eftmesh.combiner.deadlines import DeadlinePolicy
from eftmesh.combiner.monitor import DOWN
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "It was a dark night",
           "A long way from home", "The rain in Spain"]
NEW = 40
HANG_S = 6.0


PLAIN = generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_OFF)


def stream(address: str, prompt: str, speculation: generator_pb2.Speculation = PLAIN) -> tuple[str, float]:
    """Greedy text of a streamed Generate, and the longest gap between its chunks."""
    with grpc.insecure_channel(address) as ch:
        req = generator_pb2.GenerateRequest(prompt=prompt, max_new_tokens=NEW, ignore_eos=True,
                                            sampling=tensor_pb2.SamplingParams(temperature=0.0),
                                            speculation=speculation)
        text, last, gap = "", time.monotonic(), 0.0
        for chunk in generator_pb2_grpc.GeneratorStub(ch).Generate(req, timeout=120):
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            text += chunk.text
        return text, gap


def expected_texts(mesh) -> dict[str, str]:
    """Each prompt's greedy text on the shared one-replica mesh."""
    reference = f"127.0.0.1:{mesh.combiner.server.port}"
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return dict(zip(PROMPTS, (t for t, _ in pool.map(lambda p: stream(reference, p), PROMPTS))))


@dataclass
class HungMesh:
    """Two base-large replicas, the first of which hangs at its 12th call (mid-generation)
    until `gate` is set; `held` is set when it does. A combiner over them (least loaded
    routing, so both replicas get sessions)."""

    hung: Any
    healthy: Any
    others: dict[str, Any]
    cs: Any
    gate: threading.Event
    held: threading.Event

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.cs.server.port}"


@contextmanager
def hung_mesh(tiny_family, deadlines: DeadlinePolicy = DeadlinePolicy()) -> Iterator[HungMesh]:
    hung, healthy = (start_logit(tiny_family["base-large"], "base-large") for _ in range(2))
    others = {r: start_logit(tiny_family[r], r) for r in ("base-small", "ft-small")}
    gate, held = threading.Event(), threading.Event()
    original, calls = hung.engine.score_batch, []

    def stuck_after_a_few_steps(items, *args, **kwargs):
        calls.append(len(items))
        if len(calls) == 12 and not gate.is_set():  # mid-generation: the model stops answering
            held.set()
            gate.wait(30)
        return original(items, *args, **kwargs)

    hung.engine.score_batch = stuck_after_a_few_steps
    target = f"127.0.0.1:{hung.server.port},127.0.0.1:{healthy.server.port}"
    cs = start_combiner(tiny_family["base-small"], {"base-large": 0, **{r: ls.server.port for r, ls in others.items()}},
                        upstream_targets={"base-large": target},
                        policy=UpstreamPolicy(deadlines=deadlines, prefix_slack=None))
    try:
        yield HungMesh(hung, healthy, others, cs, gate, held)
    finally:
        gate.set()
        cs.stop(0)
        for ls in (hung, healthy, *others.values()):
            ls.server.stop(0).wait()


@pytest.mark.slow
@pytest.mark.e2e
def test_a_hung_replica_costs_its_streams_a_re_prefill_and_nobody_a_stall(mesh, tiny_family):
    expected = expected_texts(mesh)
    with hung_mesh(tiny_family) as m:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = {p: pool.submit(stream, m.address, p) for p in PROMPTS}
            assert m.held.wait(60), "the hung replica never got its 12th call"
            got = {p: f.result(timeout=90) for p, f in futures.items()}
        m.gate.set()  # it wakes: the held call runs late, for sessions that have moved on
        # every stream finished while the replica was still hung, with its own tokens
        assert {p: t for p, (t, _) in got.items()} == expected
        gaps = {p: round(g, 2) for p, (_, g) in got.items()}
        # the floor (1 s) + a re-prefill; a stall until the replica woke would be HANG_S or more
        assert max(gaps.values()) < 3.0, gaps
        assert m.cs.scorer.deadlines.snapshot()["base-large"]["call_s"] is not None
        # the sessions moved off it are released there once it answers again
        deadline = time.monotonic() + 10
        while len(m.hung.engine.sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(m.hung.engine.sessions) == 0, f"{len(m.hung.engine.sessions)} sessions left on the woken replica"


@pytest.mark.slow
@pytest.mark.e2e
def test_a_replica_marked_down_has_its_calls_cancelled_at_once_not_at_their_deadline(mesh, tiny_family):
    """The deadlines are set far out (a 20 s floor, as before a role's calls are timed); the
    replica hangs mid-generation and the monitor marks it down (as three missed health probes
    would): its calls in flight are cancelled then and their generations move, so no stream
    waits anywhere near the deadline."""
    expected = expected_texts(mesh)
    with hung_mesh(tiny_family, DeadlinePolicy(floor_s=20.0, cap_s=30.0)) as m:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = {p: pool.submit(stream, m.address, p) for p in PROMPTS}
            assert m.held.wait(60), "the hung replica never got its 12th call"
            replica = next(r for r in m.cs.scorer.replicas["base-large"].replicas()
                           if r.address == f"127.0.0.1:{m.hung.server.port}")
            m.cs.scorer._set_state("base-large", replica, DOWN, "health: 3 probes timed out (the test)")
            got = {p: f.result(timeout=90) for p, f in futures.items()}
        assert not m.gate.is_set()  # every stream finished while the replica was still hung
        assert {p: t for p, (t, _) in got.items()} == expected
        gaps = {p: round(g, 2) for p, (_, g) in got.items()}
        assert max(gaps.values()) < 3.0, gaps  # not the 20 s deadline


@pytest.mark.slow
@pytest.mark.e2e
def test_a_hung_draft_replica_holding_every_drafting_generation_stalls_only_those(mesh, tiny_family):
    """Two ft-small replicas; one stream drafts with ft-small, five do not. The replica that
    holds the drafting stream's session stops answering DraftBatch mid-generation (its
    ScoreBatch still answers). The step's draft call then has that one replica only: the plain
    streams step on without it (they do not use the draft call) instead of waiting for its
    deadline (10 s here), and the drafting stream moves to the other replica at the deadline.
    A CI run saw the plain streams held up so (2.4x in the chaos test) before the fix."""
    expected = expected_texts(mesh)
    a, b = (start_logit(tiny_family["ft-small"], "ft-small") for _ in range(2))
    others = {r: start_logit(tiny_family[r], r) for r in ("base-large", "base-small")}
    gate, held, drafts = threading.Event(), threading.Event(), []
    for ls in (a, b):
        def stuck_after_a_few_drafts(items, *args, _original=ls.engine.draft_batch, **kwargs):
            drafts.append(len(items))
            if len(drafts) == 6 and not gate.is_set():  # mid-generation: this replica's drafts hang
                held.set()
                gate.wait(30)
            return _original(items, *args, **kwargs)

        ls.engine.draft_batch = stuck_after_a_few_drafts
    target = f"127.0.0.1:{a.server.port},127.0.0.1:{b.server.port}"
    cs = start_combiner(tiny_family["base-small"], {**{r: ls.server.port for r, ls in others.items()}, "ft-small": 0},
                        upstream_targets={"ft-small": target},
                        policy=UpstreamPolicy(deadlines=DeadlinePolicy(floor_s=10.0, cap_s=30.0), prefix_slack=None))
    try:
        address = f"127.0.0.1:{cs.server.port}"
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            # greedy, drafting k=2 with ft-small every step: the same text as plain
            drafting = pool.submit(stream, address, PROMPTS[0], generator_pb2.Speculation(
                mode=generator_pb2.SPECULATION_MODE_FIXED, k=2))
            plain = {p: pool.submit(stream, address, p) for p in PROMPTS[1:]}
            assert held.wait(60), "the drafting stream's replica never got its 6th DraftBatch"
            got = {p: f.result(timeout=90) for p, f in plain.items()}
            assert not gate.is_set() and held.is_set()
            gaps = {p: round(g, 2) for p, (_, g) in got.items()}
            # the plain streams went on while the draft call hung (waiting for it: >= 10 s)
            assert max(gaps.values()) < 5.0, gaps
            text, gap = drafting.result(timeout=90)
        assert {p: t for p, (t, _) in got.items()} == {p: expected[p] for p in PROMPTS[1:]}
        assert text == expected[PROMPTS[0]]  # moved at its deadline, re-prefilled, exact
        assert gap >= 5.0, f"the drafting stream's longest gap was {gap:.2f} s: its draft call never hung"
    finally:
        gate.set()
        cs.stop(0)
        for ls in (a, b, *others.values()):
            ls.server.stop(0).wait()
