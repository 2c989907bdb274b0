"""Health that load cannot starve: a logit service saturated far past its concurrency limit
still answers every health check on its health port SERVING within the kubelet's default
1 s timeout. The main port's health shares the limit and threads with Score, and is reported
for information only (how often it is starved depends on timing)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eftmesh.common.serving import HEALTH_PORT_OFFSET, ServerConfig
from eftmesh.logit.server import LogitConfig, LogitServer
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

ROLE = "base-large"  # the costliest tiny model: its prefills hold the engine longest
MAX_CONCURRENT = 4
CLIENTS = 100  # the reproduction: 100 clients saturating one logit service
CHECKS = 40
PREFILL = 120  # tokens per item, near the tiny models' 128-token context
ITEMS = 4  # sessions per ScoreBatch


@pytest.fixture(scope="module")
def loaded_server(tiny_family: dict[str, Path]) -> Iterator[LogitServer]:
    cfg = LogitConfig(
        model=str(tiny_family[ROLE]), role=ROLE,
        server=ServerConfig(host="127.0.0.1", port=0, grace_s=1.0, workers=MAX_CONCURRENT,
                            max_concurrent_rpcs=MAX_CONCURRENT, health_port=0),
    )
    ls = build_logit(cfg)
    ls.start()
    yield ls
    ls.server.stop(0).wait()


def check(stub: health_pb2_grpc.HealthStub) -> str:
    """One probe as the kubelet makes it: overall health, 1 s timeout."""
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        return e.code().name


def saturate(port: int, stop: threading.Event, codes: Counter, lock: threading.Lock) -> None:
    """One client: long batched prefills, back to back, until told to stop."""
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = logit_pb2_grpc.LogitServiceStub(ch)
    sids = [uuid.uuid4().hex for _ in range(ITEMS)]  # re-prefilled from 0 each call: bounded sessions
    tokens = [(7 * i + 3) % 384 for i in range(PREFILL)]
    req = logit_pb2.ScoreBatchRequest(items=[logit_pb2.ScoreItem(session_id=s, start=0, tokens=tokens, rows=1) for s in sids])
    try:
        while not stop.is_set():
            try:
                stub.ScoreBatch(req, timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                codes[code] += 1
            if code != "OK":
                time.sleep(0.01)  # a refused client retries soon, as a loaded combiner would
    finally:
        ch.close()


def test_defaults_put_the_health_port_next_to_the_main_one():
    assert ServerConfig(port=50051).resolved_health_port() == 50051 + HEALTH_PORT_OFFSET
    assert ServerConfig(port=0).resolved_health_port() == 0
    assert ServerConfig(port=50051, health_port=9000).resolved_health_port() == 9000
    assert ServerConfig(port=50051, health_port=-1).resolved_health_port() is None


@pytest.mark.slow
@pytest.mark.e2e
def test_health_port_answers_serving_while_the_service_is_saturated(loaded_server: LogitServer):
    server = loaded_server.server
    assert server.health_port not in (None, 0, server.port)
    stop, lock, codes = threading.Event(), threading.Lock(), Counter()
    clients = [threading.Thread(target=saturate, args=(server.port, stop, codes, lock), daemon=True)
               for _ in range(CLIENTS)]
    health_ch = grpc.insecure_channel(f"127.0.0.1:{server.health_port}")
    main_ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health_stub, main_stub = health_pb2_grpc.HealthStub(health_ch), health_pb2_grpc.HealthStub(main_ch)
    on_health_port: Counter = Counter()
    on_main_port: Counter = Counter()
    try:
        assert check(health_stub) == "SERVING"  # connected before the load starts
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while sum(codes.values()) < 2 * CLIENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        with lock:
            assert codes["RESOURCE_EXHAUSTED"] > 0, f"not saturated: {dict(codes)}"
        for _ in range(CHECKS):
            on_health_port[check(health_stub)] += 1
            on_main_port[check(main_stub)] += 1
            time.sleep(0.05)
        with lock:
            during = dict(codes)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
        health_ch.close()
        main_ch.close()
    print(f"\nsaturating calls: {during}\nhealth port: {dict(on_health_port)}\nmain port: {dict(on_main_port)}")
    assert during.get("OK", 0) > 0, "the service did no real work under load"
    assert on_health_port == Counter({"SERVING": CHECKS})


@pytest.mark.e2e
def test_a_taken_default_health_port_moves_but_an_explicit_one_fails(tiny_family):
    from eftmesh.common.serving import Server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        main = busy - HEALTH_PORT_OFFSET
        if main <= 0:
            pytest.skip("no main port maps onto the taken one")
        try:
            s = Server(ServerConfig(host="127.0.0.1", port=main), [], [])
        except OSError:
            pytest.skip(f"main port {main} is in use")
        try:
            assert s.health_port not in (None, 0, busy)
        finally:
            s.stop(0).wait()
        with pytest.raises(OSError, match="--health-port"):
            Server(ServerConfig(host="127.0.0.1", port=0, health_port=busy), [], [])


def test_liveness_is_serving_while_the_process_answers_whatever_the_overall_health():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from eftmesh.common.serving import LIVENESS_SERVICE, Server, ServerConfig

    server = Server(ServerConfig(host="127.0.0.1", port=0, health_port=0), [], [], None)
    server.start()
    try:
        for port in (server.port, server.health_port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                live = stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5).status
                assert overall == health_pb2.HealthCheckResponse.NOT_SERVING  # e.g. an upstream role missing
                assert live == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0).wait()
