"""Per-role saturation metrics of a logit service (what its autoscaling reads): how long calls
queue for the engine, how full their batches are, KV cache tokens used against the pool's
capacity; read back through an in-memory reader, and by name from the Prometheus endpoint."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conftest import collect, free_port, points
from eftmesh.common import metrics
from eftmesh.common.serving import ServerConfig
from eftmesh.logit.engine import EngineConfig
from eftmesh.logit.server import LogitConfig
from eftmesh.logit.server import build as build_logit
from eftmesh.logit.servicer import TimedLock
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

pytestmark = pytest.mark.e2e

ROLE = "base-small"
MAX_BATCH = 4




@pytest.fixture(scope="module")
def service(tiny_family):
    reader = InMemoryMetricReader()
    ls = build_logit(LogitConfig(model=str(tiny_family[ROLE]), role=ROLE, engine=EngineConfig(max_batch=MAX_BATCH, kv_cache_tokens=512),
                                 server=ServerConfig(host="127.0.0.1", port=0)),
                     meter_provider=MeterProvider(metric_readers=[reader]))
    ls.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{ls.server.port}")
    yield ls, logit_pb2_grpc.LogitServiceStub(ch), reader
    ch.close()
    ls.server.stop(0).wait()


def score_items(*sids: str, n: int = 3) -> logit_pb2.ScoreBatchRequest:
    return logit_pb2.ScoreBatchRequest(items=[logit_pb2.ScoreItem(session_id=s, start=0, tokens=list(range(1, n + 1)), rows=1)
                                              for s in sids])


def release(stub, *sids: str) -> None:
    for s in sids:
        stub.Release(logit_pb2.ReleaseRequest(session_id=s))


def test_the_engine_lock_is_timed_from_outside_the_engine(service):
    ls, _, _ = service
    assert isinstance(ls.engine._lock, TimedLock)  # swapped in at build time; engine.py unchanged


def test_batch_occupancy_is_items_over_max_batch_per_call(service):
    ls, stub, reader = service
    before = {m: (p.count, p.sum) for m in ("ScoreBatch", "Score")
              for p in points(collect(reader), "eftmesh.logit.batch.occupancy", **{"rpc.method": m})}
    stub.ScoreBatch(score_items("o1", "o2", "o3"))
    stub.ScoreBatch(score_items("o4"))
    stub.Score(logit_pb2.ScoreRequest(session_id="o5", start=0, tokens=[1, 2], rows=1))
    data = collect(reader)
    (batch,) = points(data, "eftmesh.logit.batch.occupancy", **{"eftmesh.role": ROLE, "rpc.method": "ScoreBatch"})
    c0, s0 = before.get("ScoreBatch", (0, 0.0))
    assert batch.count - c0 == 2 and batch.sum - s0 == pytest.approx(3 / MAX_BATCH + 1 / MAX_BATCH)
    assert batch.explicit_bounds[-2:] == (1.0, 2.0)  # the occupancy buckets, not the seconds ones
    (single,) = points(data, "eftmesh.logit.batch.occupancy", **{"rpc.method": "Score"})
    assert single.sum - before.get("Score", (0, 0.0))[1] == pytest.approx(1 / MAX_BATCH)
    release(stub, "o1", "o2", "o3", "o4", "o5")


def test_queue_wait_is_the_time_a_call_waited_for_the_engine(service):
    ls, stub, reader = service
    stub.ScoreBatch(score_items("q0"))  # an idle engine: next to no wait
    (idle,) = points(collect(reader), "eftmesh.logit.queue.duration", **{"eftmesh.role": ROLE, "rpc.method": "ScoreBatch"})
    assert idle.count >= 1 and idle.sum / idle.count < 0.2
    count0, sum0 = idle.count, idle.sum
    hold = 0.5
    ls.engine._lock.acquire()  # another call holding the engine (not watched: records nothing)
    try:
        fut = stub.ScoreBatch.future(score_items("q1", "q2"), timeout=30)
        time.sleep(hold)
    finally:
        ls.engine._lock.release()
    assert len(fut.result().results) == 2
    (waited,) = points(collect(reader), "eftmesh.logit.queue.duration", **{"eftmesh.role": ROLE, "rpc.method": "ScoreBatch"})
    assert waited.count == count0 + 1
    assert hold * 0.8 <= waited.sum - sum0 < hold + 5
    (duration,) = points(collect(reader), "eftmesh.logit.duration",
                         **{"rpc.method": "ScoreBatch", "rpc.grpc.status_code": "OK"})
    assert duration.sum >= waited.sum  # the wait is part of the call
    release(stub, "q0", "q1", "q2")


def test_concurrent_calls_queue_behind_each_other(service):
    ls, stub, reader = service
    (before,) = points(collect(reader), "eftmesh.logit.queue.duration", **{"rpc.method": "ScoreBatch"})
    ls.engine._lock.acquire()
    try:
        futs = [stub.ScoreBatch.future(score_items(f"c{i}"), timeout=30) for i in range(3)]
        time.sleep(0.3)
    finally:
        ls.engine._lock.release()
    for f in futs:
        f.result()
    (after,) = points(collect(reader), "eftmesh.logit.queue.duration", **{"rpc.method": "ScoreBatch"})
    assert after.count - before.count == 3 and (after.sum - before.sum) >= 3 * 0.3 * 0.8
    release(stub, "c0", "c1", "c2")


def test_kv_tokens_used_against_capacity_per_role(service):
    ls, stub, reader = service
    stub.ScoreBatch(score_items("k1", "k2", n=20))
    data = collect(reader)
    (cap,) = points(data, "eftmesh.logit.kv_tokens_capacity", **{"eftmesh.role": ROLE})
    (used,) = points(data, "eftmesh.logit.kv_tokens_used", **{"eftmesh.role": ROLE})
    assert cap.value == ls.engine.pool.capacity_tokens == 512
    assert used.value == ls.engine.kv_tokens_used >= 2 * 20 and 0 < used.value / cap.value <= 1
    (usage,) = points(data, "eftmesh.logit.kv_cache.usage", **{"eftmesh.role": ROLE})  # what autoscaling targets
    assert usage.value == used.value / cap.value
    release(stub, "k1", "k2")
    data = collect(reader)
    assert points(data, "eftmesh.logit.kv_tokens_used", **{"eftmesh.role": ROLE})[0].value == 0
    assert points(data, "eftmesh.logit.kv_cache.usage", **{"eftmesh.role": ROLE})[0].value == 0


def test_failed_and_unwatched_lock_uses_record_no_wait(service):
    ls, stub, reader = service
    (before,) = points(collect(reader), "eftmesh.logit.queue.duration", **{"rpc.method": "ScoreBatch"})
    release(stub, "nothing")  # Release takes the lock: not a queued call
    threading.Thread(target=ls.engine.release, args=("x",)).start()
    with pytest.raises(grpc.RpcError):  # refused before the engine: a bad dtype
        stub.Score(logit_pb2.ScoreRequest(session_id="f", start=0, tokens=[1], rows=1, dtype=99))
    (after,) = points(collect(reader), "eftmesh.logit.queue.duration", **{"rpc.method": "ScoreBatch"})
    assert after.count == before.count
    assert not points(collect(reader), "eftmesh.logit.queue.duration", **{"rpc.method": "Release"})


def test_prometheus_shows_the_saturation_metrics_by_role(tiny_family):
    port = free_port()
    provider = metrics.make_meter_provider("eftmesh-logit-r", otlp=False, prometheus_port=port, prometheus_host="127.0.0.1")
    ls = build_logit(LogitConfig(model=str(tiny_family[ROLE]), role=ROLE, engine=EngineConfig(max_batch=MAX_BATCH),
                                 server=ServerConfig(host="127.0.0.1", port=0)), meter_provider=provider)
    ls.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ls.server.port}") as ch:
            logit_pb2_grpc.LogitServiceStub(ch).ScoreBatch(score_items("p1", "p2"))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        ls.server.stop(0).wait()
        provider.shutdown()
    lines = text.splitlines()

    def has(prefix: str) -> bool:
        return any(line.startswith(prefix) and f'eftmesh_role="{ROLE}"' in line for line in lines)

    for name in ("eftmesh_logit_queue_duration_seconds_bucket", "eftmesh_logit_queue_duration_seconds_count",
                 "eftmesh_logit_batch_occupancy_bucket", "eftmesh_logit_kv_tokens_used",
                 "eftmesh_logit_kv_tokens_capacity", "eftmesh_logit_kv_cache_usage"):
        assert has(name), (name, sorted({line.split("{")[0] for line in lines if line.startswith("eftmesh_logit")}))
