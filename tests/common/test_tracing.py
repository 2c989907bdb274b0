"""OpenTelemetry: every RPC traced on both sides, context propagated to the logit services,
one generation span with the GenAI semantic conventions' attributes (error.type on failure);
health checks and reflection never traced; nothing installed when tracing is off."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import start_combiner
from eftmesh.common import tracing
from eftmesh.common.serving import ServerConfig
from eftmesh.logit.server import LogitConfig
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import generator_pb2, generator_pb2_grpc


@pytest.fixture
def traced_mesh(tiny_family, tmp_path):
    exporter = InMemorySpanExporter()
    logits = []
    template = tmp_path / "chat.jinja"  # ft-small can chat (the tiny family ships no template)
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    for role, path in tiny_family.items():
        provider = tracing.make_tracer_provider(f"eftmesh-logit-{role}", otlp=False, exporter=exporter)
        ls = build_logit(LogitConfig(model=str(path), role=role, server=ServerConfig(host="127.0.0.1", port=0),
                                     chat_template_file=str(template) if role == "ft-small" else ""),
                         tracer_provider=provider)
        ls.start()
        logits.append(ls)
    provider = tracing.make_tracer_provider("eftmesh-combiner", otlp=False, exporter=exporter)
    cs = start_combiner(tiny_family["base-small"], {ls.engine.info.role: ls.server.port for ls in logits}, tracer_provider=provider)
    yield cs, exporter
    cs.stop(0)
    for ls in logits:
        ls.server.stop(0).wait()


@pytest.mark.e2e
def test_a_generation_is_one_trace_across_the_mesh(traced_mesh):
    cs, exporter = traced_mesh
    exporter.clear()  # start-up Info calls
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
    resp = stub.Complete(generator_pb2.CompleteRequest(
        prompt="The quick brown fox", sampling={"temperature": 0.7, "top_p": 0.9}, seed=1, max_new_tokens=4,
        speculation={"mode": generator_pb2.SPECULATION_MODE_OFF},
    ))
    spans = exporter.get_finished_spans()

    gen = [s for s in spans if s.name == "eftmesh.generate"]
    assert len(gen) == 1
    g = gen[0]
    assert g.attributes["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert g.attributes["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert g.attributes["gen_ai.request.max_tokens"] == 4
    assert g.attributes["gen_ai.request.seed"] == 1
    assert g.attributes["gen_ai.usage.output_tokens"] == len(resp.token_ids)
    assert g.attributes["gen_ai.usage.input_tokens"] == resp.usage.prompt_tokens
    assert set(g.attributes["eftmesh.roles"]) == {"base-large", "ft-small", "base-small"}
    assert "ft-small" in g.attributes["gen_ai.request.model"]
    # OpenTelemetry GenAI semantic conventions: gen_ai.provider.name replaced gen_ai.system
    assert g.attributes["gen_ai.operation.name"] == "text_completion"
    assert g.attributes["gen_ai.provider.name"] == "eftmesh"
    assert "gen_ai.system" not in g.attributes and "error.type" not in g.attributes
    assert len(g.attributes["gen_ai.response.finish_reasons"]) == 1

    trace_id = g.context.trace_id
    server_complete = [s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith("Generator/Complete")]
    assert len(server_complete) == 1 and server_complete[0].context.trace_id == trace_id
    assert g.parent.span_id == server_complete[0].context.span_id

    # Continuous batching: each scheduler step is its own span, linked to every generation it
    # advanced (OpenTelemetry's shape for batch work); its upstream calls are its children.
    steps = [s for s in spans if s.name == "eftmesh.step"]
    assert len(steps) == len(resp.token_ids)  # one token per plain step
    assert all(any(link.context.span_id == g.context.span_id for link in s.links) for s in steps)
    assert all(s.attributes["eftmesh.batch.size"] == 1 for s in steps)
    client_scores = [s for s in spans if s.kind == SpanKind.CLIENT and s.name.endswith("LogitService/ScoreBatch")]
    server_scores = [s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith("LogitService/ScoreBatch")]
    # one ScoreBatch per role per step
    assert len(client_scores) == len(server_scores) == 3 * len(steps)
    step_ids = {s.context.span_id for s in steps}
    assert all(s.parent.span_id in step_ids for s in client_scores)
    client_ids = {s.context.span_id for s in client_scores}
    assert all(s.parent.span_id in client_ids for s in server_scores), "context not propagated"
    by_id = {s.context.span_id: s for s in client_scores}
    assert all(s.context.trace_id == by_id[s.parent.span_id].context.trace_id for s in server_scores)


@pytest.mark.e2e
def test_the_generation_span_carries_speculation_figures(traced_mesh):
    cs, exporter = traced_mesh
    exporter.clear()
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
    resp = stub.Complete(generator_pb2.CompleteRequest(
        prompt="The quick brown fox", sampling={"temperature": 0.0}, max_new_tokens=12,
        speculation={"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 3},
    ))
    spans = exporter.get_finished_spans()
    (g,) = [s for s in spans if s.name == "eftmesh.generate"]
    assert g.attributes["eftmesh.speculation.mode"] == "fixed"
    assert g.attributes["eftmesh.speculation.draft_role"] == "ft-small"
    assert g.attributes["eftmesh.speculation.drafted_tokens"] == resp.speculation.drafted_tokens > 0
    assert g.attributes["eftmesh.speculation.accepted_tokens"] == resp.speculation.accepted_tokens
    assert g.attributes["eftmesh.speculation.blocks"] == resp.speculation.blocks
    assert g.attributes["eftmesh.base_calls_per_token"] == pytest.approx(resp.speculation.base_calls_per_token)
    drafts = [s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith("LogitService/DraftBatch")]
    assert len(drafts) == resp.speculation.blocks


@pytest.mark.e2e
def test_health_checks_and_reflection_are_not_traced(traced_mesh):
    cs, exporter = traced_mesh
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    exporter.clear()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    health.Check(health_pb2.HealthCheckRequest(service="eftmesh.v1.Generator"), timeout=10)
    listed = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert any(s.name == "eftmesh.v1.Generator" for s in listed[0].list_services_response.service)
    assert exporter.get_finished_spans() == ()
    # ...while an ordinary call on the same server still is
    generator_pb2_grpc.GeneratorStub(channel).Info(generator_pb2.GeneratorInfoRequest(), timeout=10)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["/eftmesh.v1.Generator/Info"], names


@pytest.mark.e2e
def test_health_and_reflection_are_filtered_on_client_channels_too():
    exporter = InMemorySpanExporter()
    provider = tracing.make_tracer_provider("x", otlp=False, exporter=exporter)
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=tracing.server_interceptors(provider))
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        channel = tracing.traced_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), provider)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert exporter.get_finished_spans() == ()
    finally:
        server.stop(0)


@pytest.mark.e2e
def test_a_refused_generation_span_carries_error_type(tiny_family, mesh):
    exporter = InMemorySpanExporter()
    provider = tracing.make_tracer_provider("eftmesh-combiner", otlp=False, exporter=exporter)
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in mesh.logits.items()},
                        tracer_provider=provider)
    try:
        stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
        exporter.clear()
        with pytest.raises(grpc.RpcError) as e:
            stub.Complete(generator_pb2.CompleteRequest(prompt="word " * 5000, max_new_tokens=2), timeout=30)
    finally:
        cs.stop(0)
    (g,) = [s for s in exporter.get_finished_spans() if s.name == "eftmesh.generate"]
    assert g.attributes["error.type"] == e.value.code().name
    assert g.attributes["gen_ai.provider.name"] == "eftmesh"
    assert g.status.status_code == StatusCode.ERROR


def test_tracing_is_off_without_an_endpoint():
    assert tracing.make_tracer_provider("x", otlp=False) is None
    assert tracing.server_interceptors(None) == []
    assert not tracing.otlp_requested({})
    assert tracing.otlp_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})


@pytest.mark.e2e
def test_a_chat_is_a_chat_operation(traced_mesh):
    """GenAI semantic conventions: messages make gen_ai.operation.name "chat" (a prompt is
    "text_completion")."""
    cs, exporter = traced_mesh
    exporter.clear()
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
    stub.Complete(generator_pb2.CompleteRequest(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=2, seed=1))
    [g] = [s for s in exporter.get_finished_spans() if s.name == "eftmesh.generate"]
    assert g.attributes["gen_ai.operation.name"] == "chat" and g.attributes["gen_ai.provider.name"] == "eftmesh"
