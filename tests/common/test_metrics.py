"""OpenTelemetry metrics of both services: what a generation, an overload and a speculative
block record, read back through an in-memory reader; the Prometheus endpoint; and no meter
provider at all when metrics are off."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conftest import collect, free_port, points, start_combiner
from eftmesh_lab import loadtest
from eftmesh.common import metrics
from eftmesh.common.serving import ServerConfig
from eftmesh.logit.server import LogitConfig
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2




@pytest.fixture(scope="module")
def measured_mesh(tiny_family):
    logit_readers, logits = [], []
    for role, path in tiny_family.items():  # one provider per service, as in its own process
        logit_readers.append(InMemoryMetricReader())
        ls = build_logit(LogitConfig(model=str(path), role=role, server=ServerConfig(host="127.0.0.1", port=0)),
                         meter_provider=MeterProvider(metric_readers=[logit_readers[-1]]))
        ls.start()
        logits.append(ls)
    reader = InMemoryMetricReader()
    ports = {ls.engine.info.role: ls.server.port for ls in logits}
    cs = start_combiner(tiny_family["base-small"], ports, meter_provider=MeterProvider(metric_readers=[reader]),
                        max_concurrent_generations=1)
    yield cs, reader, logit_readers
    cs.stop(0)
    for ls in logits:
        ls.server.stop(0).wait()


@pytest.mark.e2e
def test_a_generation_records_its_latencies_tokens_and_acceptance(measured_mesh):
    cs, reader, logit_readers = measured_mesh
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
    resp = stub.Complete(generator_pb2.CompleteRequest(
        prompt="The quick brown fox", max_new_tokens=10, ignore_eos=True,
        sampling=tensor_pb2.SamplingParams(temperature=0.0),
        speculation=generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_FIXED, k=2)), timeout=60)
    chunks = list(stub.Generate(generator_pb2.GenerateRequest(prompt="Hello", max_new_tokens=5, ignore_eos=True),
                                timeout=60))
    data = collect(reader)

    (done,) = points(data, "gen_ai.server.request.duration", **{"rpc.method": "Complete", "rpc.grpc.status_code": "OK"})
    assert done.count == 1 and done.sum > 0
    # the GenAI semantic conventions' attributes, no error.type on success
    assert done.attributes["gen_ai.operation.name"] == "text_completion"
    assert done.attributes["gen_ai.provider.name"] == "eftmesh"
    assert "ft-small" in done.attributes["gen_ai.request.model"]
    assert "error.type" not in done.attributes and "gen_ai.system" not in done.attributes
    (ttft,) = points(data, "gen_ai.server.time_to_first_token", **{"rpc.method": "Complete"})
    assert ttft.count == 1 and 0 < ttft.sum <= done.sum
    assert ttft.attributes["gen_ai.provider.name"] == "eftmesh"
    assert ttft.attributes["gen_ai.request.model"] == done.attributes["gen_ai.request.model"]
    (tpot,) = points(data, "gen_ai.server.time_per_output_token", **{"rpc.method": "Complete"})
    assert tpot.count == 1 and 0 < tpot.sum < done.sum
    (out,) = points(data, "eftmesh.tokens", **{"gen_ai.token.type": "output"})
    assert out.value == resp.usage.completion_tokens + chunks[-1].usage.completion_tokens == 15
    (inp,) = points(data, "eftmesh.tokens", **{"gen_ai.token.type": "input"})
    assert inp.value == resp.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
    (acc,) = data["eftmesh.speculation.acceptance"]
    assert acc.count >= 1 and 0 <= acc.sum <= acc.count
    # drafts per position (vLLM's accepted tokens per position): both generations' blocks
    at = {name: {p.attributes["eftmesh.speculation.position"]: p.value for p in data.get(name, [])}
          for name in ("eftmesh.speculation.drafts", "eftmesh.speculation.drafts.accepted")}
    drafted, kept = at["eftmesh.speculation.drafts"], at["eftmesh.speculation.drafts.accepted"]
    both = [resp.speculation, chunks[-1].speculation]
    assert sum(drafted.values()) == sum(u.drafted_tokens for u in both) > 0
    assert sum(kept.values()) == sum(u.accepted_tokens for u in both)
    assert {1, 2} <= set(drafted) and all(kept.get(j, 0) <= n for j, n in drafted.items())
    assert drafted[1] == sum(u.blocks for u in both)  # every block drafts a first token
    # the Generate call's adaptive speculation: each of its steps under the cap the controller chose
    caps = {p.attributes["eftmesh.speculation.cap"]: p.value for p in data.get("eftmesh.speculation.steps", [])}
    assert 1 <= sum(caps.values()) <= 5 and all(isinstance(c, int) and c >= 0 for c in caps)
    (active,) = data["eftmesh.generations.active"]
    assert active.value == 0  # both finished
    roles = {p.attributes["eftmesh.role"] for p in data["eftmesh.upstream.duration"]}
    assert roles == {"base-large", "base-small", "ft-small"}

    logit = collect(*logit_readers)
    ok = [p for p in logit["eftmesh.logit.duration"] if p.attributes["rpc.grpc.status_code"] == "OK"]
    assert {p.attributes["rpc.method"] for p in ok} == {"ScoreBatch", "DraftBatch"}
    assert sum(p.value for p in logit["eftmesh.logit.tokens"]) > 15
    assert {p.attributes["eftmesh.role"] for p in logit["eftmesh.logit.sessions"]} == {"base-large", "base-small", "ft-small"}


@pytest.mark.e2e
def test_overload_is_counted_as_rejected(measured_mesh):
    cs, reader, _ = measured_mesh
    s = loadtest.Scenario.from_dict({"call": "eftmesh.v1.Generator.Complete", "total": 8, "concurrency": 4,
                                     "data": {"prompt": "hi", "max_new_tokens": 16, "ignore_eos": True}})
    report = loadtest.run(s, f"127.0.0.1:{cs.server.port}").as_dict()
    data = collect(reader)
    (rejected,) = data["eftmesh.generations.rejected"]
    assert rejected.value >= report["status"]["RESOURCE_EXHAUSTED"] >= 1
    # ...and in gen_ai.server.request.duration, with the conventions' error.type
    (refused,) = points(data, "gen_ai.server.request.duration", **{"error.type": "RESOURCE_EXHAUSTED"})
    assert refused.count == rejected.value
    assert refused.attributes["rpc.grpc.status_code"] == "RESOURCE_EXHAUSTED"
    assert refused.attributes["gen_ai.operation.name"] == "text_completion"
    assert refused.attributes["gen_ai.provider.name"] == "eftmesh"
    assert refused.attributes["gen_ai.request.model"]  # the composition was read before admission
    assert not points(data, "gen_ai.server.time_to_first_token", **{"error.type": "RESOURCE_EXHAUSTED"})


@pytest.mark.e2e
def test_a_failed_generation_is_recorded_with_its_status(measured_mesh):
    cs, reader, _ = measured_mesh
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
    with pytest.raises(grpc.RpcError):
        stub.Complete(generator_pb2.CompleteRequest(prompt="word " * 5000, max_new_tokens=2), timeout=30)
    failed = [p for p in collect(reader)["gen_ai.server.request.duration"]
              if p.attributes["rpc.grpc.status_code"] not in ("OK", "RESOURCE_EXHAUSTED")]
    assert failed, "a refused generation should be counted with its status code"
    assert all(p.attributes["error.type"] == p.attributes["rpc.grpc.status_code"] for p in failed)


@pytest.mark.e2e
def test_an_invalid_request_is_recorded_with_error_type(measured_mesh):
    cs, reader, _ = measured_mesh
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(generator_pb2.CompleteRequest(prompt=""), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # refused before its composition was read: no gen_ai.request.model
    (bad,) = [p for p in points(collect(reader), "gen_ai.server.request.duration", **{"error.type": "INVALID_ARGUMENT"})
              if "gen_ai.request.model" not in p.attributes]
    assert bad.count == 1 and bad.attributes["gen_ai.provider.name"] == "eftmesh"


@pytest.mark.parametrize("error, expected", [
    (metrics.EftMeshError("x"), "INTERNAL"),
    (GeneratorExit(), "CANCELLED"),
    (ValueError("x"), "ValueError"),
    (TimeoutError(), "TimeoutError"),
])
def test_error_type_names_the_status_or_the_class(error, expected):
    assert metrics.error_type(error) == expected


@pytest.mark.e2e
def test_prometheus_endpoint_serves_the_combiner_metrics(mesh, tiny_family):
    port = free_port()
    provider = metrics.make_meter_provider("eftmesh-combiner", otlp=False, prometheus_port=port,
                                           prometheus_host="127.0.0.1")
    ports = {r: ls.server.port for r, ls in mesh.logits.items()}
    cs = start_combiner(tiny_family["base-small"], ports, meter_provider=provider)
    try:
        stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
        stub.Complete(generator_pb2.CompleteRequest(prompt="Hello", max_new_tokens=3), timeout=60)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        cs.stop(0)
        provider.shutdown()
    assert "gen_ai_server_request_duration_seconds_bucket" in text
    assert "gen_ai_server_time_to_first_token_seconds_count" in text
    assert "eftmesh_generations_active" in text


def test_no_meter_provider_when_metrics_are_off():
    assert metrics.make_meter_provider("x", otlp=False) is None
    assert not metrics.otlp_requested({})
    assert metrics.otlp_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
