"""Request lifecycle on the mesh: finished generations release their caches, and the client's
deadline bounds the work. Upstream lifecycle, as real servers on loopback: a combiner started
before its upstreams, a role's last replica lost and back, a draining replica's refusals."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
import time
from concurrent import futures

import grpc
import pytest
from conftest import free_ports, held_sessions, idle, start_combiner, start_logit, wait_for
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, logit_pb2, logit_pb2_grpc, tensor_pb2


def _wait_empty(mesh, timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        held = {r: len(ls.engine.sessions) for r, ls in mesh.logits.items()}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.05)  # Release is fire-and-forget: it lands a moment after the reply


@pytest.mark.parametrize("mode", [generator_pb2.SPECULATION_MODE_OFF, generator_pb2.SPECULATION_MODE_FIXED])
@pytest.mark.e2e
def test_a_finished_generation_releases_every_upstream_session(mesh, mode):
    mesh.generator.Complete(generator_pb2.CompleteRequest(
        prompt="The quick brown fox", max_new_tokens=8, speculation={"mode": mode, "k": 3},
    ))
    assert _wait_empty(mesh) == {r: 0 for r in mesh.logits}


@pytest.mark.e2e
def test_the_client_deadline_bounds_the_generation(mesh):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        mesh.generator.Complete(
            generator_pb2.CompleteRequest(prompt="The quick brown fox", max_new_tokens=64,
                                          speculation={"mode": generator_pb2.SPECULATION_MODE_OFF}),
            timeout=0.05,
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.0
    assert _wait_empty(mesh) == {r: 0 for r in mesh.logits}
    ok = mesh.generator.Complete(generator_pb2.CompleteRequest(prompt="The quick brown fox", max_new_tokens=2))
    assert len(ok.token_ids) == 2


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_family):
    from transformers import AutoTokenizer

    from eftmesh.combiner.stream import TokenSink, Usage

    tok = AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))
    sink = TokenSink(tok, (), (), 3, 100, Usage())  # what ignore_eos passes: no EOS id
    assert [sink.add(tok.eos_token_id, None) for _ in range(3)] == [False, False, True]
    assert sink.take().finish_reason.value == "length"


# --- Upstream lifecycle: start before the upstreams, a role's last replica lost and back, drain --

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Client:
    """A client of one combiner: its health, and greedy completions."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.generator = generator_pb2_grpc.GeneratorStub(self.channel)

    def status(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status

    def wait_status(self, want: int, timeout: float) -> float:
        """Seconds until health is `want`; fails after `timeout`."""
        t0 = time.monotonic()
        while self.status() != want:
            assert time.monotonic() - t0 < timeout, f"health not {want} within {timeout} s"
            time.sleep(0.05)
        return time.monotonic() - t0

    def complete(self, prompt: str = "The quick brown fox", timeout: float = 30) -> generator_pb2.CompleteResponse:
        return self.generator.Complete(generator_pb2.CompleteRequest(
            prompt=prompt, max_new_tokens=4, ignore_eos=True,
            speculation={"mode": generator_pb2.SPECULATION_MODE_OFF},
            sampling=tensor_pb2.SamplingParams(temperature=0.0)), timeout=timeout)

    def refused(self) -> tuple[grpc.RpcError, float]:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            self.complete()
        return e.value, time.monotonic() - t0


@pytest.mark.e2e
def test_a_combiner_started_before_its_upstreams_serves_once_they_answer(tiny_family):
    # every port chosen at once, health ports too: a service's default health port (its port +
    # 1000) could be another's chosen port, which it would then take first
    chosen = free_ports(2 * len(tiny_family))
    ports, health = dict(zip(tiny_family, chosen)), dict(zip(tiny_family, chosen[len(tiny_family):]))
    t0 = time.monotonic()
    cs = start_combiner(tiny_family["base-small"], ports)  # nothing listens on those ports yet
    logits = []
    try:
        assert time.monotonic() - t0 < 10  # start() does not wait for the upstreams
        client = _Client(cs.server.port)
        assert client.status() == NOT_SERVING
        err, took = client.refused()
        assert err.code() == grpc.StatusCode.UNAVAILABLE and took < 2.0
        assert "base-large" in err.details() and "waiting for" in err.details()
        logits = [start_logit(tiny_family[r], r, port=p, health_port=health[r]) for r, p in ports.items()]
        client.wait_status(SERVING, timeout=10)
        assert len(client.complete().token_ids) == 4
        assert cs.scorer.missing_roles() == []
    finally:
        cs.stop(0)
        for ls in logits:
            ls.server.stop(0).wait()


@contextmanager
def own_mesh(tiny_family) -> Iterator[tuple[dict[str, Any], Any, _Client, list[int]]]:
    """A mesh of this test's own (logit services, combiner), serving; and a client with the
    greedy tokens of its default completion."""
    logits = {r: start_logit(p, r) for r, p in tiny_family.items()}
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in logits.items()})
    try:
        client = _Client(cs.server.port)
        client.wait_status(SERVING, timeout=5)
        yield logits, cs, client, list(client.complete().token_ids)
    finally:
        cs.stop(0)
        for ls in logits.values():
            ls.server.stop(0).wait()


@pytest.mark.e2e
def test_the_last_replica_of_a_role_lost_and_back(tiny_family):
    with own_mesh(tiny_family) as (logits, cs, client, expected):
        port = logits["base-large"].server.port
        logits["base-large"].server.stop(0).wait()
        assert client.wait_status(NOT_SERVING, timeout=5) < 5
        assert cs.scorer.missing_roles() == ["base-large"]
        err, took = client.refused()
        assert err.code() == grpc.StatusCode.UNAVAILABLE and took < 2.0, (err, took)
        assert "base-large" in err.details()
        logits["base-large"] = start_logit(tiny_family["base-large"], "base-large", port=port)
        client.wait_status(SERVING, timeout=10)
        assert client.complete().token_ids == expected  # the same greedy tokens as before


@pytest.mark.e2e
def test_a_forward_out_of_memory_mid_generation_costs_a_retry_not_the_request(tiny_family):
    """base-large runs out of memory in one decode forward (a fake: its runner raises CUDA's
    OutOfMemoryError once, at the generation's fourth step): the service answers that item
    RESOURCE_EXHAUSTED, the combiner preempts the generation (releases its caches, re-prefills
    it after a back-off), and the client gets the same greedy tokens as without the failure."""
    import torch

    with own_mesh(tiny_family) as (logits, _, client, expected):
        assert wait_for(idle(logits), 5.0)
        runner = logits["base-large"].engine.runner
        real, calls = runner.forward, []

        def out_of_memory_once(batch):
            calls.append(batch)
            if len(calls) == 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (a fake)")
            return real(batch)

        runner.forward = out_of_memory_once
        assert client.complete().token_ids == expected
        # one call per token, plus the failed one; the call after it prefills the whole history
        # again (its caches were released), not a decode of one token
        assert len(calls) == len(expected) + 1 and calls[4].past == [0] and len(calls[4].ids[0]) > 3
        assert wait_for(idle(logits), 5.0), held_sessions(logits)


class FakeDrainingLogit(logit_pb2_grpc.LogitServiceServicer):
    """A fake logit replica that is draining: it answers Info as a real replica of the role
    does (so the combiner verifies it) and refuses every batched item with UNAVAILABLE
    "draining: ...", as a logit service on SIGTERM refuses new sessions."""

    def __init__(self, real: logit_pb2_grpc.LogitServiceStub) -> None:
        self.real = real
        self.refused: list[str] = []
        self.lock = threading.Lock()

    def Info(self, request, context):
        return self.real.Info(request, timeout=5)

    def _refuse(self, items):
        with self.lock:
            self.refused.extend(it.session_id for it in items)
        return [logit_pb2.ItemResult(code=grpc.StatusCode.UNAVAILABLE.value[0],
                                     message="draining: this replica takes no new sessions") for _ in items]

    def ScoreBatch(self, request, context):
        return logit_pb2.ScoreBatchResponse(results=self._refuse(request.items))

    def DraftBatch(self, request, context):
        return logit_pb2.DraftBatchResponse(results=self._refuse(request.items))

    def Release(self, request, context):
        return logit_pb2.ReleaseResponse()


@pytest.fixture
def draining_replica(tiny_family):
    """A real base-large replica and a fake draining one in front of it, plus the other roles."""
    logits = {r: start_logit(p, r) for r, p in tiny_family.items()}
    real = grpc.insecure_channel(f"127.0.0.1:{logits['base-large'].server.port}")
    fake = FakeDrainingLogit(logit_pb2_grpc.LogitServiceStub(real))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    logit_pb2_grpc.add_LogitServiceServicer_to_server(fake, server)
    hs = health.HealthServicer()
    hs.set("", SERVING)  # its health still says SERVING: only the per-item refusal tells
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    fake_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield logits, fake, fake_port
    server.stop(0).wait()
    real.close()
    for ls in logits.values():
        ls.server.stop(0).wait()


@pytest.mark.e2e
def test_a_session_refused_by_a_draining_replica_moves_to_another(tiny_family, draining_replica):
    logits, fake, fake_port = draining_replica
    ports = {r: ls.server.port for r, ls in logits.items()}
    target = f"127.0.0.1:{fake_port},127.0.0.1:{ports['base-large']}"  # the fake gets the first session
    cs = start_combiner(tiny_family["base-small"], ports, upstream_targets={"base-large": target},
                        policy=UpstreamPolicy(prefix_slack=None))  # least loaded, first listed first
    try:
        client = _Client(cs.server.port)
        client.wait_status(SERVING, timeout=5)
        got = [client.complete(p).token_ids for p in ("The quick brown fox", "Once upon a time")]
    finally:
        cs.stop(0)
    alone = start_combiner(tiny_family["base-small"], ports)
    try:
        want = [_Client(alone.server.port).complete(p).token_ids for p in ("The quick brown fox", "Once upon a time")]
    finally:
        alone.stop(0)
    assert fake.refused, "no session was sent to the draining replica"
    assert got == want  # refused sessions were re-sent from position 0 on the real replica


@pytest.mark.e2e
def test_a_session_refused_by_the_only_replica_fails_unavailable(tiny_family, draining_replica):
    logits, fake, fake_port = draining_replica
    ports = {r: ls.server.port for r, ls in logits.items()}
    cs = start_combiner(tiny_family["base-small"], ports, upstream_targets={"base-large": f"127.0.0.1:{fake_port}"})
    try:
        client = _Client(cs.server.port)
        client.wait_status(SERVING, timeout=5)
        err, took = client.refused()
    finally:
        cs.stop(0)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and took < 2.0, (err, took)
    assert "draining" in err.details() and fake.refused


@pytest.mark.e2e
def test_the_combiner_closes_client_connections_after_max_connection_age(mesh, tiny_family):
    """Long-lived clients rebalance across combiner pods: the server is built with gRPC's
    max-connection-age options from --max-connection-age / --max-connection-age-grace."""
    ports = {r: ls.server.port for r, ls in mesh.logits.items()}
    cs = start_combiner(tiny_family["base-small"], ports, max_connection_age_s=120.0, max_connection_age_grace_s=10.0)
    try:
        options = dict(cs.server.cfg.options)
    finally:
        cs.stop(0)
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 10_000
