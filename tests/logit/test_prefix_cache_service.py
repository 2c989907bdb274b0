"""Prefix caching seen from outside a logit service: the flag, Info, each item's cached tokens in
ScoreBatch and DraftBatch results, and the per-role metrics (lookups, queried and hit tokens)."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conftest import collect, points
from eftmesh.common.serving import ServerConfig
from eftmesh.logit.engine import EngineConfig
from eftmesh.logit.server import LogitConfig, parse_args
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import logit_pb2, logit_pb2_grpc, tensor_pb2

ROLE = "base-small"
PROMPT = list(range(1, 41))  # 40 tokens: two full blocks of 16 can be cached, the rest always runs


@pytest.fixture(scope="module")
def service(tiny_family):
    reader = InMemoryMetricReader()
    ls = build_logit(LogitConfig(model=str(tiny_family[ROLE]), role=ROLE, engine=EngineConfig(kv_cache_tokens=512),
                                 server=ServerConfig(host="127.0.0.1", port=0)),
                     meter_provider=MeterProvider(metric_readers=[reader]))
    ls.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{ls.server.port}")
    yield logit_pb2_grpc.LogitServiceStub(ch), reader
    ch.close()
    ls.server.stop(0).wait()


def test_the_prefix_cache_is_on_by_default_and_the_no_flag_turns_it_off():
    assert parse_args(["--model", "m", "--role", "r"]).engine.prefix_cache is True
    assert parse_args(["--model", "m", "--role", "r", "--no-prefix-cache"]).engine.prefix_cache is False


def test_a_second_session_with_the_same_prompt_reports_its_cached_tokens_and_the_metrics_count_them(service):
    stub, reader = service
    assert stub.Info(logit_pb2.LogitServiceInfoRequest()).prefix_cache is True
    first = stub.ScoreBatch(logit_pb2.ScoreBatchRequest(items=[logit_pb2.ScoreItem(
        session_id="one", start=0, tokens=PROMPT, rows=1)])).results[0]
    second = stub.ScoreBatch(logit_pb2.ScoreBatchRequest(items=[logit_pb2.ScoreItem(
        session_id="two", start=0, tokens=PROMPT + [7], rows=2)])).results[0]
    draft = stub.DraftBatch(logit_pb2.DraftBatchRequest(items=[logit_pb2.DraftItem(
        session_id="three", start=0, tokens=PROMPT, k=2, sampling=tensor_pb2.SamplingParams(temperature=0.0))])).results[0]
    assert (first.cached_tokens, second.cached_tokens, draft.cached_tokens) == (0, 32, 32)
    assert (second.cache_length, draft.cache_length) == (41, 42)
    for sid in ("one", "two", "three"):
        stub.Release(logit_pb2.ReleaseRequest(session_id=sid))
    data = collect(reader)
    attrs = {"eftmesh.role": ROLE}
    assert points(data, "eftmesh.logit.prefix_cache.lookups", **attrs)[0].value == 3
    assert points(data, "eftmesh.logit.prefix_cache.queried_tokens", **attrs)[0].value == 96
    assert points(data, "eftmesh.logit.prefix_cache.hit_tokens", **attrs)[0].value == 64
    assert points(data, "eftmesh.logit.prefix_cache.evictions", **attrs)[0].value == 0
    assert points(data, "eftmesh.logit.prefix_cache.blocks", **attrs)[0].value == 2
