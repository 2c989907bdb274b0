"""Several replicas of one role: each session stays on the replica that holds its KV cache,
new sessions go to the least-loaded replica, a failed replica loses its sessions to another
(one re-prefill, same output), and dns:/// targets find replicas as they come and go.

The unit tests use fake channels; the mesh tests run real logit services on loopback."""

from __future__ import annotations

import dataclasses
import threading
import time
import types
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import mark_live, start_combiner, start_logit
from eftmesh.combiner.replicas import ReplicaSet, parse_target, prefix_key, resolve_dns
from eftmesh.combiner.scoring import BlockCap, ModelSpec
from eftmesh.combiner.server import parse_args
from eftmesh.combiner.monitor import DOWN, LIVE
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.combiner.upstream import GrpcScorer
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2


class FakeChannel:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def fake_stub(address: str) -> tuple[FakeChannel, str]:
    return FakeChannel(), f"stub:{address}"


def verified_set(target: str, resolver=resolve_dns) -> ReplicaSet:
    rs = ReplicaSet("base-large", target, fake_stub, resolver=resolver)
    for r in rs.replicas():
        mark_live(rs, r.address)
    return rs


# --- targets and routing, no network ---------------------------------------------------------

@pytest.mark.parametrize("target, kind, entries", [
    ("h:1", "static", ["h:1"]),
    ("a:1,b:2", "static", ["a:1", "b:2"]),
    ("dns:///svc.ns:50051", "dns", ["svc.ns:50051"]),
])
def test_targets_parse(target, kind, entries):
    assert parse_target(target) == (kind, entries)


@pytest.mark.parametrize("target, message", [
    ("a:1,b", "expected HOST:PORT"), ("dns:///svc", "expected dns:///NAME:PORT"), ("a:1,a:1", "listed twice"),
])
def test_bad_targets_say_what_to_write(target, message):
    with pytest.raises(ValueError, match=message):
        parse_target(target)
    with pytest.raises(SystemExit):
        parse_args(["--upstream", f"base-large={target}", "--tokenizer", "x", "--no-default-delta"], environ={})


def test_sessions_stick_and_spread_to_the_least_loaded_replica():
    rs = verified_set("a:1,b:2")
    first = {s: rs.route(s).address for s in ("s1", "s2", "s3", "s4")}
    assert sorted(rs.load().values()) == [2, 2]
    assert all(rs.route(s).address == a for s, a in first.items())  # pinned
    rs.unpin("s1"), rs.unpin("s3")
    light = min(rs.load(), key=rs.load().get)
    assert rs.route("s5").address == light


def test_sessions_sharing_a_prefix_go_to_one_replica_within_the_slack_and_the_rest_spread():
    rs = verified_set("a:1,b:2,c:3")
    shared = list(range(100, 180))  # a system prompt longer than ROUTE_PREFIX_TOKENS
    homes = {rs.route(f"chat{i}", prefix_key(shared + [i, i + 1])).address for i in range(9)}
    assert len(homes) == 1  # the same first 64 tokens: the same replica, 9 sessions within the slack of 8 + 0
    home = homes.pop()
    spilled = rs.route("chat9", prefix_key(shared + [9]))
    assert spilled.address != home  # 9 sessions there, 0 elsewhere: beyond the slack, the least loaded
    others = {rs.route(f"user{i}", prefix_key([i] * 70)).address for i in range(40)}
    assert others == {"a:1", "b:2", "c:3"}  # unrelated prompts spread over every replica


def test_a_prefix_finds_the_same_replica_on_every_combiner_and_moves_only_when_it_goes():
    one, two = verified_set("a:1,b:2,c:3"), verified_set("c:3,a:1,b:2")  # two combiner pods
    keys = [prefix_key([i] * 64) for i in range(30)]
    first = [one.route(f"s{i}", k).address for i, k in enumerate(keys)]
    assert first == [two.route(f"s{i}", k).address for i, k in enumerate(keys)]  # stateless: they agree
    for i in range(30):
        one.unpin(f"s{i}")
    gone = next(r for r in one.replicas() if r.address == first[0])
    gone.down_until = time.monotonic() + 60  # the monitor cooled it down: no new sessions
    again = [one.route(f"t{i}", k).address for i, k in enumerate(keys)]
    assert first[0] not in again
    assert all(a == b for a, b in zip(first, again) if a != first[0])  # only its own prefixes moved


def test_prefix_routing_off_is_least_loaded():
    rs = ReplicaSet("base-large", "a:1,b:2", fake_stub, prefix_slack=None)
    for r in rs.replicas():
        mark_live(rs, r.address)
    key = prefix_key(list(range(64)))
    assert {rs.route(f"s{i}", key).address for i in range(4)} == {"a:1", "b:2"}


def test_unverified_replicas_get_no_sessions():
    rs = ReplicaSet("base-large", "a:1,b:2", fake_stub)
    mark_live(rs, "b:2")
    assert {rs.route(f"s{i}").address for i in range(4)} == {"b:2"}


def test_a_failed_replica_loses_the_session_and_new_ones_for_the_cooldown():
    """The call path reports the failure to the monitor (the one writer of replica state),
    which marks it down for the cooldown; the replica set moves the session."""
    scorer = GrpcScorer({"base-large": "a:1,b:2"})
    try:
        rs = scorer.replicas["base-large"]
        for r in rs.replicas():
            scorer._set_state("base-large", r, LIVE)
        a = next(r for r in rs.replicas() if r.address == "a:1")
        assert rs.route("s1") is a or rs.route("s2") is a
        sid = "s1" if rs.route("s1") is a else "s2"
        scorer._lost("base-large", a, "connection refused")
        moved = rs.repin(sid, a)
        assert moved.address == "b:2" and rs.route(sid) is moved
        assert a.state is DOWN and a.why == "connection refused" and a.down_until > time.monotonic()
        assert {rs.route(f"new{i}").address for i in range(3)} == {"b:2"}  # a is cooling down
    finally:
        scorer.close()


def test_with_one_replica_a_failure_keeps_the_session_there():
    rs = verified_set("a:1")
    r = rs.route("s")
    assert rs.repin("s", r) is r


def test_dns_targets_follow_the_resolution():
    answers = {"now": ["10.0.0.1:50051", "10.0.0.2:50051"]}
    rs = verified_set("dns:///svc:50051", resolver=lambda host, port: list(answers["now"]))
    assert sorted(r.address for r in rs.replicas()) == answers["now"]
    held = rs.route("s1")
    answers["now"] = [a for a in answers["now"] if a != held.address] + ["10.0.0.3:50051"]
    added, closed = rs.refresh()
    assert [r.address for r in added] == ["10.0.0.3:50051"] and closed == []
    assert held.draining and rs.route("s1") is held  # the session keeps its cache's replica
    mark_live(rs, "10.0.0.3:50051")
    assert held.address not in {rs.route(f"n{i}").address for i in range(4)}  # none new on a gone replica
    rs.unpin("s1")
    _, closed = rs.refresh()
    assert closed == [held.address] and held.channel.closed
    answers["now"] = []  # a resolver hiccup keeps what there is
    rs.refresh()
    assert len(rs.replicas()) == 2


def test_a_replica_serving_another_model_is_not_used():
    scorer = GrpcScorer({"base-large": "a:1,b:2"})
    try:
        spec = ModelSpec("base-large", "a:1,b:2", "m", 384, 384, "fp-1", 256, "float32", "cpu", 0)
        scorer.models["base-large"] = spec
        other = ModelSpec("base-large", "a:1,b:2", "other", 384, 384, "fp-2", 256, "float32", "cpu", 0)
        assert scorer._matches("base-large", spec, "a:1")
        assert not scorer._matches("base-large", other, "b:2")
    finally:
        scorer.close()


def test_a_replica_with_another_chat_template_is_not_used() -> None:
    scorer = GrpcScorer({"ft-small": "a:1,b:2"})
    try:
        first = ModelSpec("ft-small", "a:1,b:2", "m", 384, 384, "fp-1", 256, "float32", "cpu", 0, chat_template="T")
        scorer.models["ft-small"] = first
        assert scorer._matches("ft-small", dataclasses.replace(first, address="b:2"), "b:2")
        assert not scorer._matches("ft-small", dataclasses.replace(first, chat_template="U"), "b:2")
        assert not scorer._matches("ft-small", dataclasses.replace(first, chat_template=""), "b:2")
    finally:
        scorer.close()


def test_a_probe_sent_before_a_replica_came_back_does_not_take_it_out_again() -> None:
    """The race a quick restart hits: the health round's probe is sent while the replica is
    down, a call's rejoin then finds it back (live), and the probe's late "connection refused"
    arrives. That stale answer must not mark the replica down (the retried call would fail
    UNAVAILABLE with the replica serving); an answer from a probe sent later still does."""
    scorer = GrpcScorer({"ft-small": "a:1"})
    try:
        (r,) = scorer.replicas["ft-small"].replicas()
        scorer._set_state("ft-small", r, DOWN, "stopped")
        sent = time.monotonic()  # the probe goes out while the replica is down
        scorer._set_state("ft-small", r, LIVE)  # the rejoin found it back
        scorer._set_state("ft-small", r, DOWN, "connection refused", observed_at=sent)  # the stale answer
        assert r.state is LIVE
        scorer._set_state("ft-small", r, DOWN, "connection refused", observed_at=time.monotonic())
        assert r.state is DOWN
    finally:
        scorer.close()


def test_matches_refuses_a_replica_whose_max_k_is_below_the_k_cap() -> None:
    scorer = GrpcScorer({"base-large": "a:1,b:2"})
    try:
        first = ModelSpec("base-large", "a:1,b:2", "m", 384, 384, "fp-1", 256, "float32", "cpu", 0, max_k=16)
        scorer.models["base-large"] = first

        def replica(k: int) -> ModelSpec:
            return dataclasses.replace(first, max_k=k)

        assert scorer._matches("base-large", first, "a:1")  # the first replica is what the cap follows
        assert scorer._matches("base-large", replica(16), "b:2")
        assert not scorer._matches("base-large", replica(8), "b:2")  # no cap given: the first replica's
        assert scorer._matches("base-large", replica(0), "b:2")  # 0: not said (an older service)
        scorer.k_cap = BlockCap(4)  # the combiner's cap, lowered by another role's --max-k
        assert scorer._matches("base-large", replica(8), "b:2")
        assert scorer._matches("base-large", replica(4), "b:2")
        assert not scorer._matches("base-large", replica(3), "b:2")
    finally:
        scorer.close()


# --- real replicas on loopback ---------------------------------------------------------------

def count_sessions(ls) -> dict[str, int]:
    """Wrap a logit service's engine so every batched call records the session ids of its items."""
    seen: dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    for name in ("score_batch", "draft_batch"):
        original = getattr(ls.engine, name)

        def wrapped(items, *args, _original=original, **kwargs):
            with lock:
                for it in items:
                    seen[it.session_id] += 1
            return _original(items, *args, **kwargs)

        setattr(ls.engine, name, wrapped)
    return seen


def complete(address: str, prompt: str) -> generator_pb2.CompleteResponse:
    import grpc

    with grpc.insecure_channel(address) as ch:
        return generator_pb2_grpc.GeneratorStub(ch).Complete(generator_pb2.CompleteRequest(
            prompt=prompt, max_new_tokens=12, ignore_eos=True,
            sampling=tensor_pb2.SamplingParams(temperature=0.0)), timeout=60)


PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "It was a dark night"]


@pytest.fixture(scope="module")
def two_large(tiny_family):
    """base-large twice, base-small and ft-small once, and a combiner over them."""
    replicas = [start_logit(tiny_family["base-large"], "base-large") for _ in range(2)]
    others = {r: start_logit(tiny_family[r], r) for r in ("base-small", "ft-small")}
    ports = {r: ls.server.port for r, ls in others.items()}
    yield replicas, others, ports
    for ls in (*replicas, *others.values()):
        ls.server.stop(0).wait()


@pytest.mark.e2e
def test_sessions_spread_over_replicas_and_each_stays_on_one(mesh, tiny_family, two_large):
    replicas, _, ports = two_large
    expected = {p: complete(f"127.0.0.1:{mesh.combiner.server.port}", p).text for p in PROMPTS}
    seen = [count_sessions(ls) for ls in replicas]
    target = ",".join(f"127.0.0.1:{ls.server.port}" for ls in replicas)
    cs = start_combiner(tiny_family["base-small"], {"base-large": 0, **ports},
                        upstream_targets={"base-large": target},
                        policy=UpstreamPolicy(prefix_slack=None))  # least loaded: the spread is the point
    try:
        address = f"127.0.0.1:{cs.server.port}"
        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(PROMPTS, pool.map(lambda p: complete(address, p).text, PROMPTS)))
    finally:
        cs.stop(0)
    assert got == expected  # the same greedy text as with one replica
    assert all(len(s) >= 1 for s in seen), [dict(s) for s in seen]  # both replicas served sessions
    assert not set(seen[0]) & set(seen[1])  # no session touched both replicas


@pytest.mark.e2e
def test_a_replica_down_costs_a_re_prefill_on_the_other_not_the_request(mesh, tiny_family, two_large):
    _, others, ports = two_large
    expected = complete(f"127.0.0.1:{mesh.combiner.server.port}", PROMPTS[0]).text
    doomed = start_logit(tiny_family["base-large"], "base-large")
    survivor = start_logit(tiny_family["base-large"], "base-large")
    seen = count_sessions(survivor)
    target = f"127.0.0.1:{doomed.server.port},127.0.0.1:{survivor.server.port}"
    # least loaded, not prefix-aware routing: the first session goes to the first replica listed
    cs = start_combiner(tiny_family["base-small"], {"base-large": 0, **ports},
                        upstream_targets={"base-large": target}, policy=UpstreamPolicy(prefix_slack=None))
    try:
        doomed.server.stop(0).wait()  # verified at start, gone now: the first session is sent there
        started = time.monotonic()
        got = complete(f"127.0.0.1:{cs.server.port}", PROMPTS[0]).text
        rs = cs.scorer.replicas["base-large"]
        down = {r.address: r.down_until > started for r in rs.replicas()}
    finally:
        cs.stop(0)
        survivor.server.stop(0).wait()
    assert got == expected
    assert down == {f"127.0.0.1:{doomed.server.port}": True, f"127.0.0.1:{survivor.server.port}": False}
    assert len(seen) == 1 and sum(seen.values()) >= 6  # the survivor served the session, every step


@pytest.mark.e2e
def test_a_dns_target_finds_the_replica(mesh, tiny_family, two_large):
    replicas, _, ports = two_large
    port = replicas[0].server.port
    cs = start_combiner(tiny_family["base-small"], {"base-large": 0, **ports},
                        upstream_targets={"base-large": f"dns:///localhost:{port}"})
    try:
        got = complete(f"127.0.0.1:{cs.server.port}", PROMPTS[1]).text
        rs = cs.scorer.replicas["base-large"]
        usable = [r.address for r in rs.replicas() if r.verified]
    finally:
        cs.stop(0)
    assert got == complete(f"127.0.0.1:{mesh.combiner.server.port}", PROMPTS[1]).text
    assert usable == [f"127.0.0.1:{port}"]  # localhost's ::1, if any, has no server: never verified


def test_closing_waits_for_the_releases_still_in_flight(monkeypatch) -> None:
    """A generation's Release is sent without waiting, as it ends; a combiner stopped right
    after must not close the channels under it (that cancels the call, and the session would
    hold KV cache on the logit service until its idle expiry). A fake stub answers the
    Release later; close() waits for it, and for one that never answers only RELEASE_FLUSH_S."""
    from concurrent.futures import Future

    from eftmesh.combiner import releases

    scorer = GrpcScorer({"base-small": "a:1"})
    (r,) = scorer.replicas["base-small"].replicas()
    scorer._set_state("base-small", r, LIVE)
    answered, never = Future(), Future()
    sent = []

    class Release:
        @staticmethod
        def future(request, timeout):
            sent.append(request.session_id)
            return answered if request.session_id == "s1" else never

    r.stub = types.SimpleNamespace(Release=Release)
    for sid in ("s1", "s2"):
        assert scorer.replicas["base-small"].route(sid) is r
    scorer.release({"base-small": "s1"})
    scorer.release({"base-small": "s2"})
    assert sent == ["s1", "s2"]
    monkeypatch.setattr(releases, "RELEASE_FLUSH_S", 0.5)
    threading.Timer(0.2, answered.set_result, (None,)).start()
    started = time.monotonic()
    scorer.close()
    took = time.monotonic() - started
    assert answered.done() and 0.4 <= took < 3.0, took  # waited for s1, gave up on s2 at the flush limit
    assert not scorer._releasing - {never}  # the answered one left the set


def test_upstream_channels_reconnect_within_the_rejoin_window() -> None:
    """A call that finds a role's only replica gone waits rejoin_wait_s for it, but gRPC's
    reconnect back-off decides when the channel sees it back: capped at 2 s, a replica back
    after 1.0 s was seen only at ~1.6 s (measured: UpstreamPolicy.channel_options), past the 1.5 s
    default window. The cap follows the window: a sixth of it, within gRPC's 100 ms - 2 s."""

    def upstream_options(window_s: float) -> list:
        return UpstreamPolicy(rejoin_wait_s=window_s).channel_options()

    def cap(window_s: float) -> int:
        return dict(upstream_options(window_s))["grpc.max_reconnect_backoff_ms"]

    assert cap(UpstreamPolicy().rejoin_wait_s) == 250
    assert cap(0.0) == 100 and cap(60.0) == 2000
    for window in (0.3, 1.5, 3.0, 12.0):  # reconnect tries at least ~5 times within any window
        opts = dict(upstream_options(window))
        assert opts["grpc.min_reconnect_backoff_ms"] <= cap(window) <= max(100, window * 1000 / 5)
        assert opts["grpc.max_receive_message_length"] > 0  # the shared options come along


def test_finished_sessions_are_released_by_the_next_batched_call_or_by_a_release_call() -> None:
    """A replica whose Info says batch_release drops finished sessions when the combiner's next
    ScoreBatch there names them (`release`), not by a Release call each; its last session (no
    call may follow) goes by Release calls, the pending ones with it, and so does what no call
    carried by the next health round. A replica without batch_release (an older service) gets a
    Release call each, as before. A failed call's releases go the orphans' way. Fake stubs."""
    import grpc
    import torch

    from eftmesh.common import tensors
    from eftmesh.combiner.scoring import ScoreCall
    from eftmesh.v1 import logit_pb2

    scorer = GrpcScorer({"base-small": "a:1"})
    (r,) = scorer.replicas["base-small"].replicas()
    scorer._set_state("base-small", r, LIVE)
    released, carried, fail, calls = [], [], [], []

    class Release:
        @staticmethod
        def future(request, timeout):
            released.extend([request.session_id, *request.session_ids])
            calls.append([request.session_id, *request.session_ids])
            from concurrent.futures import Future
            f = Future()
            f.set_result(logit_pb2.ReleaseResponse(released=True))
            return f

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return "refused (a test)"

    def score_batch(request, timeout):
        carried.append(list(request.release))
        if fail:
            raise Refused()
        rows = torch.zeros(len(request.items), 4)
        return logit_pb2.ScoreBatchResponse(logits=tensors.to_pb(rows, rows.dtype), floored=True,
                                            results=[logit_pb2.ItemResult(rows=1) for _ in request.items])

    r.stub = types.SimpleNamespace(Release=Release, ScoreBatch=score_batch)
    for sid in ("s1", "s2", "s3"):
        assert scorer.replicas["base-small"].route(sid) is r

    def step(*sids: str) -> None:
        scorer.score_batch("base-small", [ScoreCall("base-small", s, [1, 2], 1, 1) for s in sids])

    r.batch_release = False  # an older service: a Release call each
    scorer.release({"base-small": "s1"})
    assert released == ["s1"]
    r.batch_release = True
    scorer.release({"base-small": "s2"})  # s3 still pinned there: its next call carries it
    assert released == ["s1"]
    step("s3")
    assert carried == [["s2"]] and released == ["s1"]
    step("s3")
    assert carried[-1] == []  # carried once
    assert scorer.replicas["base-small"].route("s4") is r
    scorer.release({"base-small": "s4"})
    scorer._after_round()  # no call carried it: the health round sends it
    assert released == ["s1", "s4"]
    assert scorer.replicas["base-small"].route("s5") is r
    scorer.release({"base-small": "s5"})
    fail.append(True)
    step("s3")  # refused: its releases are orphans, released once the replica answers
    assert carried[-1] == ["s5"] and scorer._orphans == {("base-small", "a:1"): {"s5": 0}}
    scorer._orphans.clear()
    assert scorer.replicas["base-small"].route("s6") is r
    scorer.release({"base-small": "s6"})  # pending: s3 is still there
    scorer.release({"base-small": "s3"})  # the last: both by Release calls at once
    assert released == ["s1", "s4", "s6", "s3"] and scorer._to_release == {}
    assert len(calls) == 4  # (an older service's Release reads session_id alone)
    r.release_many = True  # Info.release_many: the last session's Release takes the pending ones too
    for sid in ("s7", "s8", "s9"):
        assert scorer.replicas["base-small"].route(sid) is r
    scorer.release({"base-small": "s7"})
    scorer.release({"base-small": "s8"})
    scorer.release({"base-small": "s9"})
    assert calls[4:] == [["s7", "s8", "s9"]]
    assert scorer.replicas["base-small"].route("s10") is r and scorer.replicas["base-small"].route("s11") is r
    scorer.release({"base-small": "s10"})
    scorer._after_round()  # and a flush takes what no call carried in one
    assert calls[5:] == [["s10"]]
    scorer.close()
