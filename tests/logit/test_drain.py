"""A logit service drains: NOT_SERVING on both ports, no new session (UNAVAILABLE "draining:",
per item in a batch), the sessions it holds served exactly until released or the grace ends,
then it stops. In process through `LogitServer.drain`, and as a real `python -m eftmesh.logit`
process sent SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import start_logit
from eftmesh.common.errors import Unavailable
from eftmesh.common.tensors import from_pb
from eftmesh.common.errors import DRAINING_PREFIX
from eftmesh.logit.engine import ScoreItem
from eftmesh.logit.server import LogitServer
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

pytestmark = pytest.mark.e2e

ROLE = "base-small"
TOKENS = [5, 17, 99, 200, 3, 42, 383, 0, 121, 7]
SPLIT = 6  # a live session holds TOKENS[:SPLIT] when the drain starts


def health(port: int, service: str = "") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name


def wait_for(cond, timeout: float, what: str) -> float:
    """Seconds until cond() held; fails after `timeout`."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def reference_rows(stub: logit_pb2_grpc.LogitServiceStub) -> torch.Tensor:
    """Log-probs of every position of TOKENS from one full prefill (then released)."""
    sid = uuid.uuid4().hex
    r = stub.Score(logit_pb2.ScoreRequest(session_id=sid, start=0, tokens=TOKENS, rows=len(TOKENS)), timeout=30)
    stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=30)
    return from_pb(r.logprobs)


def open_session(stub: logit_pb2_grpc.LogitServiceStub) -> str:
    sid = uuid.uuid4().hex
    r = stub.Score(logit_pb2.ScoreRequest(session_id=sid, start=0, tokens=TOKENS[:SPLIT], rows=1), timeout=30)
    assert r.cache_length == SPLIT
    return sid


def finish_exactly(stub: logit_pb2_grpc.LogitServiceStub, sid: str, reference: torch.Tensor) -> None:
    """The rest of TOKENS on a session held since before the drain: the full prefill's rows."""
    r = stub.Score(logit_pb2.ScoreRequest(session_id=sid, start=SPLIT, tokens=TOKENS[SPLIT:], rows=len(TOKENS) - SPLIT),
                   timeout=30)
    assert r.cache_length == len(TOKENS)
    torch.testing.assert_close(from_pb(r.logprobs), reference[SPLIT:], atol=1e-5, rtol=0)


def assert_refused_as_draining(stub: logit_pb2_grpc.LogitServiceStub, replica: str | None = None) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(logit_pb2.ScoreRequest(session_id=uuid.uuid4().hex, start=0, tokens=TOKENS, rows=1), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details().startswith(DRAINING_PREFIX), e.value.details()
    if replica is not None:
        assert replica in e.value.details()


# --- in process ---------------------------------------------------------------------------------


@pytest.fixture
def service(tiny_family: dict[str, Path]) -> Iterator[LogitServer]:
    ls = start_logit(tiny_family[ROLE], ROLE)
    yield ls
    ls.server.stop(0).wait()


@pytest.fixture
def stub(service: LogitServer) -> Iterator[logit_pb2_grpc.LogitServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as ch:
        yield logit_pb2_grpc.LogitServiceStub(ch)


def start_drain(ls: LogitServer, grace_s: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        t = time.monotonic()
        out["stopped"] = ls.drain(grace_s)
        out["took"] = time.monotonic() - t

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def test_drain_keeps_held_sessions_refuses_new_ones_and_stops_once_all_are_released(service, stub):
    reference = reference_rows(stub)
    a, b = open_session(stub), open_session(stub)
    ports = (service.server.port, service.server.health_port)
    assert [health(p) for p in ports] == ["SERVING", "SERVING"]
    th, out = start_drain(service, grace_s=60)
    wait_for(lambda: [health(p) for p in ports] == ["NOT_SERVING", "NOT_SERVING"], 5, "NOT_SERVING on both ports")
    assert health(service.server.health_port, "eftmesh.v1.LogitService") == "NOT_SERVING"

    finish_exactly(stub, a, reference)  # a held session is still served, exactly
    assert_refused_as_draining(stub, service.replica)
    # start 0 on a session held is a rollback, not a new session: still served
    r = stub.Score(logit_pb2.ScoreRequest(session_id=a, start=0, tokens=TOKENS, rows=len(TOKENS)), timeout=30)
    torch.testing.assert_close(from_pb(r.logprobs), reference, atol=1e-5, rtol=0)

    # in a batch, only the item that would create a session fails, UNAVAILABLE "draining:"
    new = uuid.uuid4().hex
    batch = stub.ScoreBatch(logit_pb2.ScoreBatchRequest(items=[
        logit_pb2.ScoreItem(session_id=b, start=SPLIT, tokens=TOKENS[SPLIT:], rows=1),
        logit_pb2.ScoreItem(session_id=new, start=0, tokens=TOKENS, rows=1),
    ]), timeout=30)
    ok, refused = batch.results
    assert ok.code == 0 and ok.cache_length == len(TOKENS)
    assert refused.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert refused.message.startswith(DRAINING_PREFIX) and service.replica in refused.message
    draft = stub.DraftBatch(logit_pb2.DraftBatchRequest(items=[
        logit_pb2.DraftItem(session_id=new, start=0, tokens=TOKENS, k=2, seed=1),
    ]), timeout=30)
    assert draft.results[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert draft.results[0].message.startswith(DRAINING_PREFIX)

    time.sleep(0.3)
    assert th.is_alive(), "stopped while sessions were held"
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=a), timeout=30).released
    time.sleep(0.3)
    assert th.is_alive(), "stopped while a session was held"
    assert stub.Release(logit_pb2.ReleaseRequest(session_id=b), timeout=30).released
    th.join(timeout=10)
    assert not th.is_alive() and out["took"] < 30
    assert out["stopped"].wait(timeout=10)
    assert health(service.server.health_port) == "UNAVAILABLE"  # both ports closed
    with pytest.raises(grpc.RpcError) as e:
        stub.Info(logit_pb2.LogitServiceInfoRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_drain_stops_at_the_end_of_the_grace_with_sessions_still_held(service, stub):
    open_session(stub)
    t = time.monotonic()
    assert service.drain(grace_s=0.5).wait(timeout=10)
    assert 0.5 <= time.monotonic() - t < 5


def test_drain_with_no_session_stops_at_once(service):
    t = time.monotonic()
    assert service.drain(grace_s=60).wait(timeout=10)
    assert time.monotonic() - t < 5


def test_a_draining_engine_creates_no_session_but_serves_those_it_holds(service):
    engine = service.engine
    engine.score_batch([ScoreItem("held", 0, TOKENS[:SPLIT], 1)])
    engine.start_draining("replica-7")
    assert engine.live_sessions == 1
    held, new = engine.score_batch([ScoreItem("held", SPLIT, TOKENS[SPLIT:], 1), ScoreItem("new", 0, TOKENS, 1)])
    assert held.error is None and held.cache_length == len(TOKENS)
    assert isinstance(new.error, Unavailable)
    assert str(new.error).startswith(f"{DRAINING_PREFIX} replica replica-7 ({ROLE})")
    assert engine.live_sessions == 1  # the refused item left nothing behind
    with pytest.raises(Unavailable):
        engine.score("other", 0, TOKENS, 1)
    assert engine.release("held") and engine.live_sessions == 0


# --- a real process sent SIGTERM -----------------------------------------------------------------


class Process:
    """`python -m eftmesh.logit` with its log read line by line."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "eftmesh.logit", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def find(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "exited:\n" + "\n".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {timeout} s:\n" + "\n".join(self.lines))


@pytest.mark.slow
def test_sigterm_drains_a_real_process_which_exits_0_once_its_last_session_is_released(tiny_family):
    grace = 60.0
    p = Process(["--model", str(tiny_family[ROLE]), "--role", ROLE, "--host", "127.0.0.1", "--port", "0",
                 "--health-port", "0", "--grace", str(grace), "--device", "cpu", "--threads", "1"])
    try:
        m = p.find(r"serving on port (\d+) \(health port (\d+)\)", timeout=180)
        port, health_port = int(m.group(1)), int(m.group(2))
        assert health(health_port) == "SERVING" and health(port) == "SERVING"
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = logit_pb2_grpc.LogitServiceStub(ch)
        reference = reference_rows(stub)
        sid = open_session(stub)

        sent = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        took = wait_for(lambda: health(health_port) == "NOT_SERVING", 5, "NOT_SERVING on the health port")
        assert took < 2
        assert health(port) == "NOT_SERVING"
        finish_exactly(stub, sid, reference)
        assert_refused_as_draining(stub, f":{port}")
        time.sleep(0.5)
        assert p.proc.poll() is None, "exited while a session was held"

        assert stub.Release(logit_pb2.ReleaseRequest(session_id=sid), timeout=30).released
        assert p.proc.wait(timeout=grace / 2) == 0
        assert time.monotonic() - sent < grace / 2
        p.find(r"draining: no session left", timeout=5)
        ch.close()
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
